//! HTTP client for talking to nodes and routers: a pooled keep-alive hyper client, and
//! the admin calls of the control API on top of it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::topology::Topology;
use crate::wire::{NodeStatus, RoleRequest};

/// Body of an outgoing request.
pub type RequestBody = BoxBody<Bytes, Infallible>;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL could not be built from the address and path.
    #[error("invalid address or path: {0}")]
    Url(String),
    /// The request body could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(String),
    /// The connection was refused or could not be made: nothing was sent.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// Target address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// Sending or receiving failed after connecting.
    #[error("request to {addr} failed: {message}")]
    Transport {
        /// Target address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// No answer in time.
    #[error("request to {0} timed out")]
    Timeout(String),
    /// The caller stopped waiting: the replica lost its leadership without answering.
    #[error("{0} stopped leading its shard and did not answer")]
    Abandoned(String),
    /// The peer answered with an error status.
    #[error("{addr} answered {status}: {body}")]
    Status {
        /// Target address.
        addr: String,
        /// Status code.
        status: StatusCode,
        /// Body text.
        body: String,
    },
    /// The answer was not what was expected.
    #[error("cannot decode answer from {addr}: {message}")]
    Decode {
        /// Target address.
        addr: String,
        /// What went wrong.
        message: String,
    },
}

/// A whole (buffered) response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Wraps bytes as a request body.
pub fn full(bytes: impl Into<Bytes>) -> RequestBody {
    Full::new(bytes.into()).boxed()
}

/// A pooled keep-alive HTTP/1.1 client. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, RequestBody>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client with keep-alive pooling and `TCP_NODELAY`.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        HttpClient { inner }
    }

    /// Sends a request and buffers the answer, within `timeout`.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let addr = authority(&req);
        let answered = tokio::time::timeout(timeout, self.exchange(req, &addr)).await;
        answered.map_err(|_| ClientError::Timeout(addr))?
    }

    /// Sends a request to `addr` and buffers the answer, however long that takes.
    async fn exchange(
        &self,
        req: Request<RequestBody>,
        addr: &str,
    ) -> Result<Response, ClientError> {
        let resp = self.inner.request(req).await.map_err(|e| {
            let (addr, message) = (addr.to_string(), error_chain(&e));
            if e.is_connect() {
                ClientError::Connect { addr, message }
            } else {
                ClientError::Transport { addr, message }
            }
        })?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                addr: addr.to_string(),
                message: e.to_string(),
            })?
            .to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Builds and sends `method http://addr path` with `body`.
    pub async fn call(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.send(request(method, addr, path, headers, body)?, timeout)
            .await
    }

    /// `GET http://addr path`.
    pub async fn get(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.call(Method::GET, addr, path, &[], full(Bytes::new()), timeout)
            .await
    }

    /// `POST http://addr path` with a body of `content_type`.
    pub async fn post(
        &self,
        addr: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.call(
            Method::POST,
            addr,
            path,
            &[("content-type", content_type)],
            full(body),
            timeout,
        )
        .await
    }

    /// `POST http://addr path` with a body streamed from `chunks`. Nothing limits the
    /// whole: a snapshot of a large shard takes as long as it takes. The call fails once
    /// the body has not moved for `stall` (the receiver stopped reading, or `chunks`
    /// stopped coming), or when no answer came `stall` after the body's end.
    pub async fn post_stream(
        &self,
        addr: &str,
        path: &str,
        chunks: tokio::sync::mpsc::Receiver<Bytes>,
        stall: Duration,
    ) -> Result<Response, ClientError> {
        // Counts the chunks the connection has taken: hyper asks for the next one only
        // once it has written the last, so a receiver that stops reading stops it.
        let taken = Arc::new(AtomicU64::new(0));
        let counter = taken.clone();
        let stream = futures_util::stream::unfold(chunks, move |mut chunks| {
            let counter = counter.clone();
            async move {
                let chunk = chunks.recv().await?;
                counter.fetch_add(1, Ordering::Relaxed);
                Some((Ok(Frame::data(chunk)), chunks))
            }
        });
        let req = request(
            Method::POST,
            addr,
            path,
            &[("content-type", "application/octet-stream")],
            StreamBody::new(stream).boxed(),
        )?;
        let call = self.exchange(req, addr);
        tokio::pin!(call);
        let mut seen = 0;
        loop {
            tokio::select! {
                r = &mut call => return r,
                () = tokio::time::sleep(stall) => {
                    let now = taken.load(Ordering::Relaxed);
                    if now == seen {
                        return Err(ClientError::Timeout(addr.to_string()));
                    }
                    seen = now;
                }
            }
        }
    }

    /// Sends `value` as JSON and decodes a JSON answer; an error status is an error.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        value: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let body = match value {
            Some(v) => full(serde_json::to_vec(v).map_err(|e| ClientError::Encode(e.to_string()))?),
            None => full(Bytes::new()),
        };
        let resp = self
            .call(
                method,
                addr,
                path,
                &[("content-type", "application/json")],
                body,
                timeout,
            )
            .await?;
        decode_json(addr, &resp)
    }
}

/// Decodes a JSON answer; an error status is an error.
fn decode_json<T: DeserializeOwned>(addr: &str, resp: &Response) -> Result<T, ClientError> {
    if !resp.status.is_success() {
        return Err(ClientError::Status {
            addr: addr.to_string(),
            status: resp.status,
            body: String::from_utf8_lossy(&resp.body).into_owned(),
        });
    }
    serde_json::from_slice(&resp.body).map_err(|e| ClientError::Decode {
        addr: addr.to_string(),
        message: e.to_string(),
    })
}

/// `method http://addr path` with `headers` and `body`.
fn request(
    method: Method,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: RequestBody,
) -> Result<Request<RequestBody>, ClientError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(body)
        .map_err(|e| ClientError::Url(e.to_string()))
}

/// The `host:port` a request goes to, for errors.
fn authority(req: &Request<RequestBody>) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The control API of nodes and routers, as the playground and the operator call it.
#[derive(Clone)]
pub struct AdminClient {
    http: HttpClient,
    timeout: Duration,
}

impl AdminClient {
    /// A client whose calls give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        AdminClient {
            http: HttpClient::new(),
            timeout,
        }
    }

    /// `GET /internal/status` of the node at `addr`.
    pub async fn status(&self, addr: &str) -> Result<NodeStatus, ClientError> {
        self.http
            .json(
                Method::GET,
                addr,
                "/internal/status",
                None::<&()>,
                self.timeout,
            )
            .await
    }

    /// `GET /internal/status?verify=1`: the digest recomputed by a full scan.
    pub async fn verified_status(&self, addr: &str) -> Result<NodeStatus, ClientError> {
        self.http
            .json(
                Method::GET,
                addr,
                "/internal/status?verify=1",
                None::<&()>,
                self.timeout.max(Duration::from_secs(30)),
            )
            .await
    }

    /// `POST /internal/role` to the node at `addr`; answers with its status. The request
    /// carries its send time so the lease runs from then, however late it is read.
    pub async fn set_role(&self, addr: &str, req: &RoleRequest) -> Result<NodeStatus, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Encode(e.to_string()))?;
        let issued = unix_ms().to_string();
        let resp = self
            .http
            .call(
                Method::POST,
                addr,
                "/internal/role",
                &[
                    ("content-type", "application/json"),
                    (ISSUED_AT_HEADER, &issued),
                ],
                full(body),
                self.timeout,
            )
            .await?;
        decode_json(addr, &resp)
    }

    /// `PUT /internal/topology` on a router's admin listener.
    pub async fn push_topology(&self, addr: &str, topology: &Topology) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .http
            .json(
                Method::PUT,
                addr,
                "/internal/topology",
                Some(topology),
                self.timeout,
            )
            .await?;
        Ok(())
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }
}

/// Header of a role request: when the control plane sent it, in Unix milliseconds.
pub const ISSUED_AT_HEADER: &str = "x-distkv-issued-at-ms";

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// Serves, on loopback, a route that reads a body to its end and answers its length.
    async fn body_length_server() -> String {
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// `count` chunks of `size` bytes, `gap` apart; the stream then ends if `end`, and
    /// otherwise stays open with nothing more to send.
    fn chunks(count: usize, size: usize, gap: Duration, end: bool) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..count {
                tokio::time::sleep(gap).await;
                if tx.send(Bytes::from(vec![7u8; size])).await.is_err() {
                    return;
                }
            }
            if !end {
                tx.closed().await;
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_stream_that_keeps_moving_is_not_cut_off_however_long_it_takes() {
        let addr = body_length_server().await;
        // 1.2 s in all, four times the stall limit, and never 300 ms without a chunk.
        let body = chunks(12, 1024, Duration::from_millis(100), true);
        let resp = HttpClient::new()
            .post_stream(&addr, "/", body, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(resp.body, "12288");
    }

    #[tokio::test]
    async fn a_stream_whose_chunks_stop_coming_gives_up() {
        let addr = body_length_server().await;
        let body = chunks(2, 1024, Duration::ZERO, false);
        let err = HttpClient::new()
            .post_stream(&addr, "/", body, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    }

    #[tokio::test]
    async fn a_stream_the_receiver_stops_reading_gives_up() {
        // Accepts, then reads nothing: the socket's buffers fill and the body stops.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move { listener.accept().await.unwrap() });
        let body = chunks(usize::MAX, 256 << 10, Duration::ZERO, true);
        let err = HttpClient::new()
            .post_stream(&addr, "/", body, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");
        drop(held);
    }
}
