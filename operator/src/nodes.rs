//! The operator's calls into the data plane, behind traits so reconcile tests can feed
//! observations and record what was sent.

use std::time::Duration;

use dataplane::topology::Topology;
use dataplane::wire::{NodeStatus, RoleRequest};
use futures::future::BoxFuture;

/// Why a call to a node or router failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No answer within the timeout.
    #[error("{0}: timed out")]
    Timeout(String),
    /// Connection or protocol failure.
    #[error("{0}: {1}")]
    Transport(String, String),
    /// The peer answered with an error status.
    #[error("{0}: HTTP {1}: {2}")]
    Status(String, u16, String),
    /// The body was not what the wire contract says.
    #[error("{0}: bad response body: {1}")]
    Decode(String, serde_json::Error),
}

/// Reads a replica's own report (`GET /internal/status`).
pub trait ReplicaObserver: Send + Sync {
    /// The status of the replica listening at `address` (`host:port`).
    fn status<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<NodeStatus, NodeError>>;
}

/// Tells nodes their role and routers the topology.
pub trait NodeControl: Send + Sync {
    /// `POST /internal/role` on the node at `address`.
    fn set_role<'a>(
        &'a self,
        address: &'a str,
        request: &'a RoleRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
    /// `PUT /internal/topology` on the router admin listener at `admin_address`.
    fn push_topology<'a>(
        &'a self,
        admin_address: &'a str,
        topology: &'a Topology,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
}

/// Request body of the HTTP client: one whole buffer, nothing streamed.
type Body = http_body_util::Full<hyper::body::Bytes>;

/// The real data plane over plain HTTP/1.1 with keep-alive, one short timeout per call:
/// a replica that cannot answer within it counts as unreachable this round.
#[derive(Clone)]
pub struct HttpNodes {
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    timeout: Duration,
}

impl HttpNodes {
    /// A client whose every call gives up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpNodes { client, timeout }
    }

    async fn call(
        &self,
        method: http::Method,
        address: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, NodeError> {
        use http_body_util::BodyExt;
        let target = format!("{address}{path}");
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{address}{path}"));
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Body::from(body.unwrap_or_default()))
            .map_err(|e| NodeError::Transport(target.clone(), e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| NodeError::Transport(target.clone(), e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| NodeError::Transport(target.clone(), e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes).chars().take(300).collect();
                return Err(NodeError::Status(target.clone(), status.as_u16(), text));
            }
            Ok(bytes.to_vec())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| NodeError::Timeout(target.clone()))?
    }
}

impl ReplicaObserver for HttpNodes {
    fn status<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<NodeStatus, NodeError>> {
        Box::pin(async move {
            let body = self
                .call(http::Method::GET, address, "/internal/status", None)
                .await?;
            serde_json::from_slice(&body).map_err(|e| NodeError::Decode(address.to_string(), e))
        })
    }
}

impl NodeControl for HttpNodes {
    fn set_role<'a>(
        &'a self,
        address: &'a str,
        request: &'a RoleRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(request).expect("a RoleRequest always serializes");
            self.call(http::Method::POST, address, "/internal/role", Some(body))
                .await
                .map(drop)
        })
    }

    fn push_topology<'a>(
        &'a self,
        admin_address: &'a str,
        topology: &'a Topology,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(topology).expect("a Topology always serializes");
            self.call(http::Method::PUT, admin_address, "/internal/topology", Some(body))
                .await
                .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on loopback answering `status` with `body`; returns its
    /// address and a handle yielding the request it saw.
    async fn serve_once(status: &'static str, body: String) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            // Read until the headers and the declared body are in.
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>().unwrap()))
                        .unwrap_or(0);
                    if seen.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&seen).to_string()
        });
        (addr, handle)
    }

    fn sample_status() -> NodeStatus {
        NodeStatus {
            id: "s0-r1".into(),
            role: dataplane::topology::Role::Follower,
            epoch: 3,
            last_epoch: 3,
            last_seq: 42,
            commit_seq: 42,
            in_sync: vec![],
            lease_remaining_ms: 0,
            keys: 7,
            digest: "abc".into(),
            log_start_seq: 0,
            snapshots_installed: 0,
            follower_acks: vec![],
        }
    }

    #[tokio::test]
    async fn status_decodes_the_wire_type() {
        let (addr, seen) = serve_once("200 OK", serde_json::to_string(&sample_status()).unwrap()).await;
        let nodes = HttpNodes::new(Duration::from_secs(2));
        assert_eq!(nodes.status(&addr).await.unwrap(), sample_status());
        assert!(seen.await.unwrap().starts_with("GET /internal/status HTTP/1.1"));
    }

    #[tokio::test]
    async fn set_role_posts_json_and_reports_refusals() {
        let (addr, seen) = serve_once("409 Conflict", r#"{"error":{"code":"stale_epoch"}}"#.into()).await;
        let nodes = HttpNodes::new(Duration::from_secs(2));
        let request = RoleRequest {
            epoch: 2,
            role: dataplane::topology::Role::Leader,
            leader: None,
            in_sync: vec!["s0-r0".into()],
            lease_ms: 5000,
            peers: vec![],
            slot_ranges: vec![(0, 16383)],
            mode: dataplane::wire::AckMode::Sync,
            min_in_sync: 1,
        };
        let err = nodes.set_role(&addr, &request).await.unwrap_err();
        assert!(matches!(err, NodeError::Status(_, 409, _)), "{err}");
        let seen = seen.await.unwrap();
        assert!(seen.starts_with("POST /internal/role HTTP/1.1"), "{seen}");
        assert!(seen.contains(r#""epoch":2"#), "{seen}");
    }

    #[tokio::test]
    async fn an_unreachable_node_is_an_error_not_a_hang() {
        // Bind then drop a listener so the port is closed.
        let addr = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let nodes = HttpNodes::new(Duration::from_millis(500));
        assert!(nodes.status(&addr).await.is_err());
    }
}
