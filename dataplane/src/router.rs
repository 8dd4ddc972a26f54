//! The router (`distkv router`): hashes each key to its slot, forwards the request to the
//! shard's leader over one shared connection per node (the [`crate::link`]), and retries
//! once when the leader moved. Stateless apart from the topology the control plane pushes to it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router as App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::api::{self, ApiError, Limits};
use crate::budget::{BodyBudget, Held};
use crate::client::{self, AdminClient, ClientError};
use crate::link::{LinkRequest, Links};
use crate::metrics::{self, Metrics};
use crate::slots::{Slot, slot_for};
use crate::topology::{ReplicaInfo, Role, ShardInfo, Topology, TopologyError};
use crate::wire::NodeStatus;

/// Settings of a router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Key and value limits, enforced before forwarding.
    pub limits: Limits,
    /// File the topology is (re)loaded from, when the control plane writes one.
    pub topology_file: Option<PathBuf>,
    /// Timeout of one forwarded request.
    pub timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            limits: Limits::default(),
            topology_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A topology with its slot table.
struct Routing {
    topology: Topology,
    owner: Vec<u32>,
}

impl Routing {
    /// A topology to route by; it must assign every slot.
    fn new(topology: Topology) -> Result<Self, TopologyError> {
        let owner = topology.slot_table()?;
        Ok(Routing { topology, owner })
    }

    /// Nothing to route by: only a router's state before its first topology, as one
    /// installed later would make every key unavailable until a restart.
    fn empty() -> Self {
        Routing {
            topology: Topology::default(),
            owner: Vec::new(),
        }
    }

    fn shard(&self, slot: Slot) -> Option<&ShardInfo> {
        let index = *self.owner.get(usize::from(slot))?;
        self.topology.shards.get(index as usize)
    }

    /// Whether the replica at `addr` leads a shard.
    fn leads(&self, addr: &str) -> bool {
        self.topology
            .shards
            .iter()
            .any(|s| s.leader_address() == Some(addr))
    }
}

/// A running router.
pub struct Router {
    cfg: RouterConfig,
    routing: RwLock<Arc<Routing>>,
    nodes: Links,
    admin: AdminClient,
    metrics: Arc<Metrics>,
    next_replica: AtomicUsize,
    /// Room for the request bodies the router holds at once.
    bodies: BodyBudget,
}

/// How long a follower may take over a stale read before the leader is asked instead.
const STALE_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// How long requests held by a replica that lost its leadership are still waited for.
/// A live one answers them within milliseconds (421, or `leadership_ended` for a write
/// that was waiting on its followers); one that has not after this is stopped or cut
/// off, and its requests would otherwise wait out the whole request timeout.
const DEPOSED_GRACE: Duration = Duration::from_secs(1);

/// Headers passed from client to node.
const FORWARD_REQUEST: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
];
/// Headers passed from node to client.
const FORWARD_RESPONSE: [HeaderName; 3] = [header::CONTENT_TYPE, header::ETAG, header::RETRY_AFTER];

impl Router {
    /// A router with the topology from `cfg.topology_file` if it exists, else empty.
    pub fn new(cfg: RouterConfig) -> Arc<Router> {
        let router = Arc::new(Router {
            routing: RwLock::new(Arc::new(Routing::empty())),
            nodes: Links::default(),
            admin: AdminClient::new(Duration::from_millis(500)),
            metrics: Metrics::new(metrics::Exporter::Router),
            next_replica: AtomicUsize::new(0),
            bodies: cfg.limits.body_budget(),
            cfg,
        });
        router.metrics.watch_bodies(router.bodies.clone());
        if let Some(path) = &router.cfg.topology_file {
            router.install_file(path, std::fs::read(path));
        }
        router
    }

    /// Installs `topology` if it is newer than the one in use.
    pub fn install(self: &Arc<Self>, topology: Topology) -> Result<bool, TopologyError> {
        let version = topology.version;
        let routing = Arc::new(Routing::new(topology)?);
        let old = {
            let mut current = self.routing.write().unwrap();
            if version <= current.topology.version {
                return Ok(false);
            }
            std::mem::replace(&mut *current, routing.clone())
        };
        self.metrics.topology_version.set(version as i64);
        tracing::info!(version, "topology installed");
        for shard in &old.topology.shards {
            if let Some(addr) = shard.leader_address()
                && !routing.leads(addr)
            {
                self.abandon_later(addr.to_owned());
            }
        }
        Ok(true)
    }

    /// After [`DEPOSED_GRACE`], fails what the replica at `addr` still holds, unless it
    /// leads a shard again by then.
    fn abandon_later(self: &Arc<Self>, addr: String) {
        let router = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DEPOSED_GRACE).await;
            if router.routing().leads(&addr) {
                return;
            }
            let n = router.nodes.abandon(&addr);
            if n > 0 {
                tracing::warn!(replica = %addr, requests = n, "gave up on requests held by a replica that lost its leadership");
            }
        });
    }

    /// The topology in use.
    pub fn topology(&self) -> Topology {
        self.routing.read().unwrap().topology.clone()
    }

    fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap().clone()
    }

    /// Reloads the topology file, if there is one (a leader moved).
    async fn reload_file(self: &Arc<Self>) {
        if let Some(path) = &self.cfg.topology_file {
            self.install_file(path, tokio::fs::read(path).await);
        }
    }

    /// Installs the topology read from the file at `path`, if it reads and is newer.
    fn install_file(self: &Arc<Self>, path: &std::path::Path, read: std::io::Result<Vec<u8>>) {
        let Ok(text) = read else {
            return;
        };
        match serde_json::from_slice::<Topology>(&text) {
            Ok(t) => {
                if let Err(e) = self.install(t) {
                    tracing::warn!(error = %e, "topology file is invalid");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read topology file")
            }
        }
    }

    /// The public app: the client API, forwarded; never `/internal/*`.
    pub fn app(self: &Arc<Self>) -> App {
        let app = App::new()
            .route(
                "/v1/kv/{*key}",
                get(forward_v1).put(forward_v1).delete(forward_v1),
            )
            .route("/v1/kv/", api::empty_key_route())
            .route("/put", post(forward_demo_put))
            .route("/get", get(forward_demo_key))
            .route("/delete", api::demo_delete_route(forward_demo_key))
            .route("/v1/cluster", get(cluster))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/openapi.json", get(crate::openapi::serve))
            .with_state(self.clone());
        metrics::instrument(app, &self.metrics)
    }

    /// The admin app, on a separate listener: topology pushes from the control plane.
    pub fn admin_app(self: &Arc<Self>) -> App {
        App::new()
            .route("/internal/topology", put(put_topology).get(get_topology))
            .route("/healthz", get(healthz))
            .with_state(self.clone())
            .fallback(api::unknown_route)
            .method_not_allowed_fallback(api::wrong_method)
    }

    /// Forwards a request for `key` to its shard's leader (or any replica for a stale
    /// read). A leader change answered by the node (421 or 409) or a refused connection
    /// makes it reload the topology and try once more.
    async fn forward(
        self: &Arc<Self>,
        key: &[u8],
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
        stale: bool,
    ) -> Result<Response, ApiError> {
        let slot = slot_for(key);
        // What a failure says of a request that reached the replica: a write (the demo's
        // `GET /delete` is one too) may have been applied.
        let read = (method == Method::GET || method == Method::HEAD)
            && !path_and_query.starts_with("/delete");
        let unknown = if read {
            ""
        } else {
            "; the write's outcome is unknown"
        };
        let request = LinkRequest {
            method: &method,
            target: path_and_query,
            headers,
            pass: &FORWARD_REQUEST,
            body: &body,
        };
        let mut hint: Option<String> = None;
        for attempt in 0..2 {
            let routing = self.routing();
            let shard = routing.shard(slot).ok_or_else(|| {
                ApiError::unavailable("no_topology", "the router has no topology yet")
            })?;
            let addr = match hint.take() {
                Some(h) => h,
                None => self.pick(shard, stale)?,
            };
            // A follower that does not answer a stale read quickly is not waited for: the
            // leader can answer it too.
            let on_follower = stale && shard.leader_address() != Some(addr.as_str());
            let timeout = if on_follower {
                STALE_READ_TIMEOUT.min(self.cfg.timeout)
            } else {
                self.cfg.timeout
            };
            let result = self.nodes.send(&addr, request, timeout).await;
            let retry = attempt == 0;
            match result {
                // Refused before anything was sent: no replica would take it either.
                Err(ClientError::Encode(e)) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request_header_fields_too_large",
                        format!("the request cannot be forwarded whole: {e}"),
                    ));
                }
                Err(e) if retry && on_follower => {
                    tracing::debug!(error = %e, "stale read failed on a follower; asking the leader");
                    self.metrics.retries.inc();
                    hint = shard.leader_address().map(str::to_owned);
                }
                // Moved again after a reload: the replica's own 421 or 409 would tell the
                // client nothing it can act on.
                Ok(r) if moved(r.status) && !retry => break,
                Ok(r) if moved(r.status) => {
                    self.metrics.retries.inc();
                    self.reload_file().await;
                    hint = api::leader_in_error(&r.body).filter(|h| *h != addr);
                }
                Ok(r) => return Ok(into_response(r, &method)),
                Err(e) if retry && may_resend(&e, read) => {
                    self.metrics.retries.inc();
                    self.reload_file().await;
                }
                Err(ClientError::Timeout(_)) => {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!("replica {addr} did not answer in time{unknown}"),
                    ));
                }
                Err(e) => {
                    // Cut off after it was sent (the replica died), unless it never connected.
                    let sent = !matches!(e, ClientError::Connect { .. });
                    let outcome = if sent { unknown } else { "" };
                    return Err(ApiError::unavailable(
                        "upstream_unavailable",
                        format!("{e}{outcome}"),
                    ));
                }
            }
        }
        Err(ApiError::unavailable(
            "leader_moved",
            "the shard's leader changed and the new one is not known yet; retry",
        ))
    }

    /// The leader, or for a stale read any replica of the in-sync set in turn: one out of
    /// it may be far behind, or dead.
    fn pick(&self, shard: &ShardInfo, stale: bool) -> Result<String, ApiError> {
        let in_sync = || shard.replicas.iter().filter(|r| r.in_sync);
        let count = in_sync().count();
        if stale && count > 0 {
            let i = self.next_replica.fetch_add(1, Ordering::Relaxed) % count;
            return Ok(in_sync().nth(i).expect("i < count").address.clone());
        }
        shard.leader_address().map(str::to_owned).ok_or_else(|| {
            ApiError::unavailable(
                "no_leader",
                format!("shard {} has no leader right now", shard.id),
            )
        })
    }
}

/// Whether a request that failed with `e` may go again, after a topology reload.
fn may_resend(e: &ClientError, read: bool) -> bool {
    match e {
        // Nothing was sent on a refused connection, so even a write may go again.
        ClientError::Connect { .. } => true,
        // A read that got no answer changes nothing: it may go again, to the new leader
        // when the old one was given up on.
        ClientError::Abandoned(_) | ClientError::Transport { .. } => read,
        _ => false,
    }
}

fn moved(status: StatusCode) -> bool {
    status == StatusCode::MISDIRECTED_REQUEST || status == StatusCode::CONFLICT
}

/// The node's answer, passed on.
fn into_response(r: client::Response, method: &Method) -> Response {
    let mut resp = Response::new(Body::from(r.body));
    *resp.status_mut() = r.status;
    for h in FORWARD_RESPONSE {
        if let Some(v) = r.headers.get(&h) {
            resp.headers_mut().insert(h, v.clone());
        }
    }
    // A HEAD answer has no body to measure: the length is the one a GET would have.
    if method == Method::HEAD
        && let Some(v) = r.headers.get(header::CONTENT_LENGTH)
    {
        resp.headers_mut().insert(header::CONTENT_LENGTH, v.clone());
    }
    resp
}

type RouterState = State<Arc<Router>>;

fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

async fn forward_v1(State(r): RouterState, req: Request) -> Result<Response, ApiError> {
    // Taken whole rather than through extractors, which would copy the URI and headers.
    let (parts, body) = req.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    // The body first: an answer that leaves it unread costs the client its connection.
    let (body, _held) = if method == Method::PUT {
        let limit = r.cfg.limits.max_value_bytes;
        api::read_body(&headers, body, limit, "value", &r.bodies).await?
    } else {
        (Bytes::new(), Held::default())
    };
    let key = api::key_from_path(uri.path(), &r.cfg.limits)?;
    // Refused here as the node would refuse it, without a trip to the leader.
    if method == Method::PUT || method == Method::DELETE {
        api::condition(&headers)?;
    }
    let stale = method == Method::GET && api::wants_stale(uri.query())?;
    r.forward(&key, method, path_and_query(&uri), &headers, body, stale)
        .await
}

async fn forward_demo_put(State(r): RouterState, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let limit = r.cfg.limits.max_json_bytes();
        let (body, _held) = api::read_body(&headers, body, limit, "body", &r.bodies).await?;
        let put = api::parse_demo_put(&body, &r.cfg.limits)?;
        r.forward(
            put.key.as_bytes(),
            Method::POST,
            "/put",
            &headers,
            body,
            false,
        )
        .await
    };
    run.await.unwrap_or_else(ApiError::into_demo)
}

async fn forward_demo_key(
    State(r): RouterState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let key = api::demo_key(uri.query(), &r.cfg.limits)?;
        let stale = uri.path() == "/get" && api::wants_stale(uri.query())?;
        r.forward(
            &key,
            method,
            path_and_query(&uri),
            &headers,
            Bytes::new(),
            stale,
        )
        .await
    };
    run.await.unwrap_or_else(ApiError::into_demo)
}

/// `GET /v1/cluster` answer: the topology with each replica's live state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// Topology version.
    pub version: u64,
    /// Number of hash slots.
    pub slots: u16,
    /// Shards.
    pub shards: Vec<ShardView>,
}

/// One shard in `GET /v1/cluster`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardView {
    /// Shard id.
    pub id: u32,
    /// Leadership epoch.
    pub epoch: u64,
    /// Leader replica id.
    pub leader: Option<String>,
    /// Inclusive slot ranges.
    pub slot_ranges: Vec<(Slot, Slot)>,
    /// Replicas with their live state.
    pub replicas: Vec<ReplicaView>,
}

/// One replica in `GET /v1/cluster`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaView {
    /// Replica id.
    pub id: String,
    /// Address.
    pub address: String,
    /// Role as the replica reports it (as the topology says when unreachable).
    pub role: Role,
    /// Highest epoch the replica has seen.
    pub epoch: u64,
    /// Epoch of its last log entry.
    pub last_epoch: u64,
    /// Last applied log seq.
    pub applied_seq: u64,
    /// Highest committed seq it knows.
    pub commit_seq: u64,
    /// Keys stored.
    pub keys: u64,
    /// In the in-sync set.
    pub in_sync: bool,
    /// Whether it answered.
    pub reachable: bool,
}

/// `GET /v1/cluster`: topology and per-replica state.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "Topology and replica states", body = ClusterView)))]
pub async fn cluster(State(r): RouterState) -> axum::Json<ClusterView> {
    let topology = r.topology();
    // Every replica at once: one that does not answer costs its timeout once, not once
    // per shard in turn.
    let calls = topology
        .shards
        .iter()
        .flat_map(|shard| &shard.replicas)
        .map(|rep| r.admin.status(&rep.address));
    let mut statuses = futures_util::future::join_all(calls).await.into_iter();
    let shards = topology
        .shards
        .iter()
        .map(|shard| ShardView {
            id: shard.id,
            epoch: shard.epoch,
            leader: shard.leader.clone(),
            slot_ranges: shard.slot_ranges.clone(),
            replicas: shard
                .replicas
                .iter()
                .zip(statuses.by_ref())
                .map(|(rep, st)| ReplicaView::of(rep, st.ok()))
                .collect(),
        })
        .collect();
    axum::Json(ClusterView {
        version: topology.version,
        slots: topology.slots,
        shards,
    })
}

impl ReplicaView {
    /// A replica as the topology lists it and as it reported itself, if it answered.
    fn of(rep: &ReplicaInfo, status: Option<NodeStatus>) -> ReplicaView {
        let s = status.as_ref();
        ReplicaView {
            id: rep.id.clone(),
            address: rep.address.clone(),
            role: s.map_or(rep.role, |s| s.role),
            epoch: s.map_or(0, |s| s.epoch),
            last_epoch: s.map_or(0, |s| s.last_epoch),
            applied_seq: s.map_or(0, |s| s.last_seq),
            commit_seq: s.map_or(0, |s| s.commit_seq),
            keys: s.map_or(0, |s| s.keys),
            in_sync: rep.in_sync,
            reachable: status.is_some(),
        }
    }
}

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: every shard has a leader.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "Every shard has a leader"), (status = 503, description = "Not ready")))]
pub async fn readyz(State(r): RouterState) -> Response {
    let routing = r.routing();
    let t = &routing.topology;
    let ready = !t.shards.is_empty() && t.shards.iter().all(|s| s.leader_address().is_some());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "version": t.version})),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text.
// Documented here; served by `metrics::serve`.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics_doc() {}

async fn put_topology(
    State(r): RouterState,
    body: Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let t: Topology = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid topology: {e}")))?;
    let applied = r
        .install(t)
        .map_err(|e| ApiError::bad_request("invalid_topology", e.to_string()))?;
    let version = r.routing().topology.version;
    Ok(axum::Json(
        serde_json::json!({"applied": applied, "version": version}),
    ))
}

async fn get_topology(State(r): RouterState) -> axum::Json<Topology> {
    axum::Json(r.topology())
}
