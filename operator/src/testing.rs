//! Test doubles: an in-memory Kubernetes API server behind a `kube::Client`, and fake
//! replicas and routers behind the data plane traits.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use dataplane::topology::{Role, Topology};
use dataplane::wire::{FollowerAck, NodeStatus, RoleRequest};
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::nodes::{NodeControl, NodeError, ReplicaObserver};

/// One request the fake API server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// JSON body, `Null` when empty.
    pub body: Value,
}

#[derive(Default)]
struct ApiState {
    objects: BTreeMap<String, Value>,
    pods: Vec<Pod>,
    requests: Vec<Recorded>,
    next_rv: u64,
    failing: Vec<String>,
    hanging: Vec<String>,
    hooks: Vec<(String, Hook)>,
}

/// Something a test runs while the server handles a request (e.g. let time pass).
type Hook = Arc<dyn Fn() + Send + Sync>;

/// An in-memory API server understanding what the operator does: server-side apply
/// (stored as sent, but refusing changed StatefulSet volumeClaimTemplates), status apply,
/// listing and deleting pods, creating Events.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    /// A client talking to this server.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Replaces the pods the server lists.
    pub fn set_pods(&self, pods: Vec<Pod>) {
        self.state.lock().unwrap().pods = pods;
    }

    /// Stores `object` at `path`, as if a user had created or updated it.
    pub fn put(&self, path: &str, object: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), object);
    }

    /// Answers 500 to every request whose path contains `fragment`.
    pub fn fail_paths(&self, fragment: &str) {
        self.state
            .lock()
            .unwrap()
            .failing
            .push(fragment.to_string());
    }

    /// Never answers a request whose path contains `fragment` (a partitioned API server).
    pub fn hang_paths(&self, fragment: &str) {
        self.state
            .lock()
            .unwrap()
            .hanging
            .push(fragment.to_string());
    }

    /// Runs `hook` before answering each request whose path contains `fragment`, as a
    /// slow server would let time pass.
    pub fn on_request(&self, fragment: &str, hook: Hook) {
        self.state
            .lock()
            .unwrap()
            .hooks
            .push((fragment.to_string(), hook));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// The stored object at `path`.
    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Event notes the operator created, with their reasons.
    pub fn events(&self) -> Vec<(String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
            .map(|r| {
                (
                    r.body["reason"].as_str().unwrap_or_default().to_string(),
                    r.body["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<kube::client::Body> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        if self
            .state
            .lock()
            .unwrap()
            .hanging
            .iter()
            .any(|f| path.contains(f.as_str()))
        {
            return std::future::pending().await;
        }
        let hooks: Vec<Hook> = (self.state.lock().unwrap().hooks.iter())
            .filter(|(f, _)| path.contains(f.as_str()))
            .map(|(_, h)| h.clone())
            .collect();
        for hook in hooks {
            hook();
        }
        let mut st = self.state.lock().unwrap();
        st.requests.push(Recorded {
            method: parts.method.clone(),
            path: path.clone(),
            query,
            body: body.clone(),
        });
        if st.failing.iter().any(|f| path.contains(f.as_str())) {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "InternalError", "code": 500, "message": "injected failure"}),
            );
        }
        st.next_rv += 1;
        let rv = st.next_rv.to_string();
        match parts.method {
            Method::PATCH if path.ends_with("/status") => {
                let object_path = path.trim_end_matches("/status").to_string();
                let mut object = st.objects.get(&object_path).cloned().unwrap_or_else(|| {
                    json!({"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": {"name": last(&object_path)}})
                });
                object["status"] = body["status"].clone();
                object["metadata"]["resourceVersion"] = json!(rv);
                st.objects.insert(object_path, object.clone());
                reply(StatusCode::OK, &object)
            }
            Method::PATCH
                if path.contains("/statefulsets/")
                    && st.objects.get(&path).is_some_and(|stored| {
                        stored["spec"]["volumeClaimTemplates"]
                            != body["spec"]["volumeClaimTemplates"]
                    }) =>
            {
                // As the real API server: a StatefulSet's volumeClaimTemplates never change.
                reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422, "message": "StatefulSet.apps is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"}),
                )
            }
            Method::PATCH => {
                let mut object = body;
                object["metadata"]["resourceVersion"] = json!(rv);
                object["metadata"]["uid"] = json!(format!("uid-{}", last(&path)));
                st.objects.insert(path, object.clone());
                reply(StatusCode::OK, &object)
            }
            Method::PUT => {
                let mut object = body;
                object["metadata"]["resourceVersion"] = json!(rv);
                st.objects.insert(path, object.clone());
                reply(StatusCode::OK, &object)
            }
            Method::POST => {
                let mut object = body;
                object["metadata"]["resourceVersion"] = json!(rv);
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or("x")
                    .to_string();
                st.objects.insert(format!("{path}/{name}"), object.clone());
                reply(StatusCode::CREATED, &object)
            }
            Method::GET if path.ends_with("/pods") => {
                let items: Vec<Value> = st
                    .pods
                    .iter()
                    .map(|p| serde_json::to_value(p).unwrap())
                    .collect();
                reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            Method::DELETE if path.contains("/pods/") => {
                let name = last(&path);
                let before = st.pods.len();
                st.pods
                    .retain(|p| p.metadata.name.as_deref() != Some(name.as_str()));
                if st.pods.len() == before {
                    return not_found(&name);
                }
                reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                )
            }
            Method::GET => match st.objects.get(&path) {
                Some(object) => reply(StatusCode::OK, object),
                None => not_found(&last(&path)),
            },
            _ => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"kind": "Status", "code": 405}),
            ),
        }
    }
}

fn last(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}

fn reply(status: StatusCode, body: &Value) -> Response<kube::client::Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn not_found(name: &str) -> Response<kube::client::Body> {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{name} not found")}),
    )
}

/// Fake replicas and routers: a replica answers with a status that follows the roles it
/// was sent (a leader reports every follower caught up), unless it was taken down.
#[derive(Clone, Default)]
pub struct FakeNodes {
    inner: Arc<Mutex<FakeNodesState>>,
}

#[derive(Default)]
struct FakeNodesState {
    nodes: HashMap<String, NodeStatus>,
    down: Vec<String>,
    roles: Vec<(String, RoleRequest)>,
    pushes: Vec<(String, u64)>,
}

impl FakeNodes {
    /// Adds a fresh, unassigned replica listening at `address`.
    pub fn add(&self, address: &str, id: &str) {
        let status = NodeStatus::unassigned(id);
        self.inner
            .lock()
            .unwrap()
            .nodes
            .insert(address.to_string(), status);
    }

    /// Gives the replica at `address` a log of `seq` entries at epoch `epoch`.
    pub fn set_log(&self, address: &str, epoch: u64, seq: u64) {
        let mut st = self.inner.lock().unwrap();
        let status = st.nodes.get_mut(address).expect("known replica");
        status.last_epoch = epoch;
        status.epoch = status.epoch.max(epoch);
        status.last_seq = seq;
        status.commit_seq = seq;
    }

    /// Makes the replica at `address` stop answering.
    pub fn take_down(&self, address: &str) {
        self.inner.lock().unwrap().down.push(address.to_string());
    }

    /// Role requests received, in order, with their target address.
    pub fn roles(&self) -> Vec<(String, RoleRequest)> {
        self.inner.lock().unwrap().roles.clone()
    }

    /// Topology pushes received: router address and topology version.
    pub fn pushes(&self) -> Vec<(String, u64)> {
        self.inner.lock().unwrap().pushes.clone()
    }
}

impl ReplicaObserver for FakeNodes {
    fn status<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<NodeStatus, NodeError>> {
        let st = self.inner.lock().unwrap();
        let result = match st.nodes.get(address) {
            Some(status) if !st.down.iter().any(|d| d == address) => Ok(status.clone()),
            _ => Err(NodeError::Timeout(address.to_string())),
        };
        Box::pin(async move { result })
    }
}

impl NodeControl for FakeNodes {
    fn set_role<'a>(
        &'a self,
        address: &'a str,
        request: &'a RoleRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let mut st = self.inner.lock().unwrap();
        let result = if st.down.iter().any(|d| d == address) {
            Err(NodeError::Timeout(address.to_string()))
        } else if let Some(status) = st.nodes.get_mut(address) {
            status.role = request.role;
            status.epoch = status.epoch.max(request.epoch);
            if request.role == Role::Leader {
                status.in_sync = request.in_sync.clone();
                status.lease_remaining_ms = request.lease_ms;
                status.follower_acks = request
                    .peers
                    .iter()
                    .map(|p| FollowerAck {
                        id: p.id.clone(),
                        acked_seq: status.last_seq,
                        last_contact_ms: 10,
                    })
                    .collect();
            } else {
                status.in_sync = vec![];
                status.follower_acks = vec![];
            }
            st.roles.push((address.to_string(), request.clone()));
            Ok(())
        } else {
            Err(NodeError::Timeout(address.to_string()))
        };
        Box::pin(async move { result })
    }

    fn push_topology<'a>(
        &'a self,
        admin_address: &'a str,
        topology: &'a Topology,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        self.inner
            .lock()
            .unwrap()
            .pushes
            .push((admin_address.to_string(), topology.version));
        Box::pin(async { Ok(()) })
    }
}
