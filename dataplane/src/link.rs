//! The link: how distkv's own processes call a replica (the router forwarding client
//! requests, a leader sending batches to a follower). HTTP requests multiplexed on one TCP
//! connection per replica, in a lean frame format, served by the replica's own HTTP app
//! on its usual port.
//!
//! It replaces HTTP/2 on these hops because HTTP/2's machinery (HPACK, per-stream state
//! and flow control) was most of a replica's CPU per GET, and much of the router's, while
//! the hops need none of it: both ends are ours, requests are small and whole, and every
//! answer is buffered anyway. What stays is what the hop does need: many requests in
//! flight on one connection, answers in any order, and frames from many requests leaving
//! in one write when they queue up together.
//!
//! A connection opens with [`PREFACE`]; a node's listener tells it from HTTP by those
//! eight bytes, so nodes keep one port. Then frames, `len u32 | payload`:
//! - request: `id u32 | method (u8 len) | target (u16 len) | headers | body`;
//! - response: `id u32 | status u16 | headers | body`;
//! - headers: `count u8`, then per header `name (u8 len) | value (u16 len)`. Headers that
//!   do not fit are an error ([`HeaderError`]) and nothing is sent, never left out.
//!
//! Lengths are big-endian; the body is the rest of the frame. A malformed frame closes
//! the connection: its peer is a distkv process, so it is a bug, not a client mistake.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::header::{CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::client::{ClientError, Response};

/// First bytes of a link connection; no HTTP request starts like this.
pub const PREFACE: &[u8; 8] = b"DKVLINK1";

/// Largest frame either end accepts. Room for a frame grows as its bytes arrive, never
/// up front by its announced length, so this only bounds what a broken peer can make us
/// hold.
const MAX_FRAME: usize = 1 << 30;

/// Bytes of frames a connection may have queued and not yet written. A node that stops
/// reading (stopped, or at [`MAX_IN_FLIGHT`]) fails requests beyond this at once rather
/// than have them pile up in the caller's memory.
const MAX_QUEUED: usize = 64 << 20;

/// Requests one connection may have in a node's hands at once; past this the node stops
/// reading until some finish, and TCP pushes back on the caller.
const MAX_IN_FLIGHT: usize = 4096;

/// Capacity kept for the buffers frames are read into and written from.
const BUFFER: usize = 64 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame ended before a field it announced.
    #[error("frame truncated in its {0}")]
    Truncated(&'static str),
    /// A field held a value it may not.
    #[error("invalid {0} in frame")]
    Invalid(&'static str),
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Why a request's headers cannot go in a frame. Nothing is sent then: a request that
/// lost a header on the way (an `If-Match`, say) would be another request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// A value longer than a frame's 16-bit length holds.
    #[error("the {name} header is {len} bytes; a forwarded header may have at most 65535")]
    ValueTooLong {
        /// The header.
        name: HeaderName,
        /// Its value's length.
        len: usize,
    },
    /// A name longer than a frame's 8-bit length holds.
    #[error("a header name of {0} bytes; a forwarded header name may have at most 255")]
    NameTooLong(usize),
    /// More values than a frame's 8-bit count holds.
    #[error("{0} header values; at most 255 are forwarded")]
    TooMany(usize),
}

/// Checks that `headers` fit in a frame, every one of them.
fn check_headers<'h>(
    headers: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
) -> Result<(), HeaderError> {
    let mut count = 0;
    for (name, value) in headers {
        if name.as_str().len() > usize::from(u8::MAX) {
            return Err(HeaderError::NameTooLong(name.as_str().len()));
        }
        if value.len() > usize::from(u16::MAX) {
            return Err(HeaderError::ValueTooLong {
                name: name.clone(),
                len: value.len(),
            });
        }
        count += 1;
    }
    if count > usize::from(u8::MAX) {
        return Err(HeaderError::TooMany(count));
    }
    Ok(())
}

/// A request for a replica.
#[derive(Clone, Copy)]
pub struct LinkRequest<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query, passed on as they came.
    pub target: &'a str,
    /// Headers to take the sent ones from.
    pub headers: &'a HeaderMap,
    /// The headers sent: every value `headers` holds under these names, in order (read in
    /// place, so forwarding a client's request copies nothing into a list first).
    pub pass: &'a [HeaderName],
    /// Body.
    pub body: &'a [u8],
}

impl<'a> LinkRequest<'a> {
    /// Whether the headers it sends fit in a frame; [`Links::send`] sends nothing else.
    fn check(&self) -> Result<(), HeaderError> {
        check_headers(self.sent_headers())
    }

    /// The headers the request sends, repeated ones included: a node decides on all of
    /// them (two `If-Match` headers are refused), so sending one would change the answer.
    fn sent_headers(&self) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + use<'a> {
        let (headers, pass) = (self.headers, self.pass);
        pass.iter()
            .flat_map(move |name| headers.get_all(name).iter().map(move |v| (name, v)))
    }
}

/// An empty header map, for a [`LinkRequest`] that sends no headers.
pub fn no_headers() -> &'static HeaderMap {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    EMPTY.get_or_init(HeaderMap::new)
}

/// A request as a node decodes it.
#[derive(Debug)]
struct Incoming {
    id: u32,
    method: Method,
    target: Uri,
    headers: HeaderMap,
    body: Bytes,
}

// ---- frames -------------------------------------------------------------------------

/// Appends one request frame to `out`; its headers passed [`LinkRequest::check`].
fn put_request(out: &mut BytesMut, id: u32, req: &LinkRequest<'_>) {
    let at = begin_frame(out, id);
    put_short(out, req.method.as_str().as_bytes());
    // Fits: the `http` crate refuses URIs of 64 KiB or more.
    out.put_u16(req.target.len() as u16);
    out.put_slice(req.target.as_bytes());
    put_headers(out, req.sent_headers());
    out.put_slice(req.body);
    end_frame(out, at);
}

/// Appends one response frame to `out`; its headers passed [`check_headers`].
fn put_response(out: &mut BytesMut, id: u32, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    let at = begin_frame(out, id);
    out.put_u16(status.as_u16());
    put_headers(out, headers.iter());
    out.put_slice(body);
    end_frame(out, at);
}

fn begin_frame(out: &mut BytesMut, id: u32) -> usize {
    let at = out.len();
    out.put_u32(0); // the length, filled in by `end_frame`
    out.put_u32(id);
    at
}

fn end_frame(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u8(bytes.len() as u8);
    out.put_slice(bytes);
}

fn put_headers<'h>(
    out: &mut BytesMut,
    headers: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
) {
    let count_at = out.len();
    out.put_u8(0);
    let mut count = 0usize;
    for (name, value) in headers {
        // The lengths fit: the caller checked them, as a frame may not lose a header.
        put_short(out, name.as_str().as_bytes());
        out.put_u16(value.len() as u16);
        out.put_slice(value.as_bytes());
        count += 1;
    }
    out[count_at] = count as u8;
}

/// Splits the next whole frame's payload off `buf`, if it holds one.
fn take_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("four bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        // In steps: twelve bytes announcing a gigabyte must not allocate one.
        buf.reserve((4 + len - buf.len()).min(BUFFER));
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Reads the fields of one frame payload in order.
struct Fields(Bytes);

impl Fields {
    fn need(&self, n: usize, what: &'static str) -> Result<(), FrameError> {
        if self.0.remaining() < n {
            return Err(FrameError::Truncated(what));
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }

    fn headers(&mut self) -> Result<HeaderMap, FrameError> {
        let count = self.u8("header count")?;
        let mut headers = HeaderMap::with_capacity(usize::from(count));
        for _ in 0..count {
            let len = self.u8("header name")?;
            let name = self.bytes(usize::from(len), "header name")?;
            let len = self.u16("header value")?;
            let value = self.bytes(usize::from(len), "header value")?;
            let name =
                HeaderName::from_bytes(&name).map_err(|_| FrameError::Invalid("header name"))?;
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| FrameError::Invalid("header value"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

fn decode_request(payload: Bytes) -> Result<Incoming, FrameError> {
    let mut f = Fields(payload);
    let id = f.u32("id")?;
    let len = f.u8("method")?;
    let method = f.bytes(usize::from(len), "method")?;
    let method = Method::from_bytes(&method).map_err(|_| FrameError::Invalid("method"))?;
    let len = f.u16("target")?;
    let target = f.bytes(usize::from(len), "target")?;
    let target = Uri::from_maybe_shared(target).map_err(|_| FrameError::Invalid("target"))?;
    if target.scheme().is_some() || target.path_and_query().is_none() {
        return Err(FrameError::Invalid("target"));
    }
    let headers = f.headers()?;
    Ok(Incoming {
        id,
        method,
        target,
        headers,
        body: f.0,
    })
}

fn decode_response(payload: Bytes) -> Result<(u32, Response), FrameError> {
    let mut f = Fields(payload);
    let id = f.u32("id")?;
    let status =
        StatusCode::from_u16(f.u16("status")?).map_err(|_| FrameError::Invalid("status"))?;
    let headers = f.headers()?;
    Ok((
        id,
        Response {
            status,
            headers,
            body: f.0,
        },
    ))
}

// ---- writing ------------------------------------------------------------------------

/// Frames waiting for the connection's writer task. Senders append under a short lock and
/// wake the writer, which takes everything queued at once: under load many frames leave
/// in one write.
struct Outbox {
    queued: Mutex<Queued>,
    wake: Notify,
}

struct Queued {
    bytes: BytesMut,
    closed: bool,
}

/// What became of a frame pushed to an [`Outbox`].
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    /// The connection is closed; nothing was sent.
    Closed,
    /// This many bytes wait already: the peer is not reading.
    Full(usize),
}

impl Outbox {
    fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            queued: Mutex::new(Queued {
                bytes: BytesMut::with_capacity(BUFFER),
                closed: false,
            }),
            wake: Notify::new(),
        })
    }

    /// Queues a frame written by `put`, unless the outbox is closed or full.
    fn push(&self, put: impl FnOnce(&mut BytesMut)) -> Pushed {
        let mut q = self.queued.lock().unwrap();
        if q.closed {
            return Pushed::Closed;
        }
        if q.bytes.len() >= MAX_QUEUED {
            return Pushed::Full(q.bytes.len());
        }
        put(&mut q.bytes);
        drop(q);
        self.wake.notify_one();
        Pushed::Queued
    }

    /// Refuses new frames; the writer sends what is queued, then ends the stream.
    fn close(&self) {
        self.queued.lock().unwrap().closed = true;
        self.wake.notify_one();
    }

    /// The writer task: until closed, writes whatever is queued.
    async fn run(self: Arc<Self>, mut wr: OwnedWriteHalf) -> std::io::Result<()> {
        let mut spare = BytesMut::with_capacity(BUFFER);
        loop {
            self.wake.notified().await;
            // Let the tasks that are ready queue their frames too: one write for them all.
            tokio::task::yield_now().await;
            let closed = {
                let mut q = self.queued.lock().unwrap();
                std::mem::swap(&mut q.bytes, &mut spare);
                q.closed
            };
            if !spare.is_empty() {
                let written = wr.write_all(&spare).await;
                if written.is_err() {
                    self.close();
                }
                written?;
                spare.clear();
                if spare.capacity() > 16 * BUFFER {
                    // One large value should not pin a large buffer for good.
                    spare = BytesMut::with_capacity(BUFFER);
                }
            }
            if closed {
                return wr.shutdown().await;
            }
        }
    }
}

// ---- the caller's side ----------------------------------------------------------------

/// Links to replicas, one per address, made on first use and replaced when broken.
#[derive(Default)]
pub struct Links {
    links: RwLock<HashMap<String, Arc<Link>>>,
}

/// One connection to a node.
struct Link {
    outbox: Arc<Outbox>,
    waiting: Mutex<HashMap<u32, oneshot::Sender<Response>>>,
    next_id: AtomicU32,
    /// Set when the caller gave up on the node ([`Links::abandon`]) rather than the
    /// connection failing: the requests it fails say so.
    abandoned: AtomicBool,
    /// The link's reader and writer tasks, ended when it is abandoned: a node that is
    /// stopped or cut off would otherwise keep them waiting for good.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Link {
    fn is_closed(&self) -> bool {
        self.outbox.queued.lock().unwrap().closed
    }

    /// Fails every request still waiting: their answers will not come.
    fn fail_all(&self) {
        self.outbox.close();
        self.waiting.lock().unwrap().clear();
    }
}

/// Removes a request's entry when its caller stops waiting (answer, timeout or the
/// client going away), so a dead request leaves nothing behind.
struct Waiting<'a> {
    link: &'a Link,
    id: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.link.waiting.lock().unwrap().remove(&self.id);
    }
}

impl Links {
    /// Sends `req` to the node at `addr` and waits for its answer, within `timeout`.
    /// A connection that cannot be made is [`ClientError::Connect`]: nothing was sent.
    /// Headers that do not fit in a frame ([`LinkRequest::check`]) are
    /// [`ClientError::Encode`], and nothing is sent either.
    pub async fn send(
        &self,
        addr: &str,
        req: LinkRequest<'_>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        req.check()
            .map_err(|e| ClientError::Encode(e.to_string()))?;
        let call = async {
            // A link found closed has sent nothing of this request; one fresh try.
            for _ in 0..2 {
                let link = self.link(addr).await?;
                let id = link.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                link.waiting.lock().unwrap().insert(id, tx);
                let waiting = Waiting { link: &link, id };
                match link.outbox.push(|out| put_request(out, id, &req)) {
                    Pushed::Queued => {}
                    Pushed::Closed => continue,
                    Pushed::Full(queued) => {
                        return Err(ClientError::Transport {
                            addr: addr.to_string(),
                            message: format!(
                                "the node is not reading: {queued} bytes of requests wait to be sent"
                            ),
                        });
                    }
                }
                let answer = rx.await;
                drop(waiting);
                return answer.map_err(|_| {
                    if link.abandoned.load(Ordering::Relaxed) {
                        ClientError::Abandoned(addr.to_string())
                    } else {
                        ClientError::Transport {
                            addr: addr.to_string(),
                            message: "connection to the node closed before it answered".into(),
                        }
                    }
                });
            }
            Err(ClientError::Connect {
                addr: addr.to_string(),
                message: "connection closed as it was made".into(),
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(addr.to_string()))?
    }

    /// Gives up on the requests waiting for the node at `addr`, if any: the control
    /// plane moved its leadership away and it has not answered them. They fail with
    /// [`ClientError::Abandoned`], and the next request to `addr` opens a new connection.
    /// Returns how many were waiting.
    pub fn abandon(&self, addr: &str) -> usize {
        let mut links = self.links.write().unwrap();
        let waiting = links
            .get(addr)
            .map_or(0, |link| link.waiting.lock().unwrap().len());
        if waiting == 0 {
            // An idle link to a node that may now be a live follower is worth keeping.
            return 0;
        }
        let link = links.remove(addr).expect("found above");
        drop(links);
        link.abandoned.store(true, Ordering::Relaxed);
        link.fail_all();
        for task in link.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        waiting
    }

    async fn link(&self, addr: &str) -> Result<Arc<Link>, ClientError> {
        if let Some(link) = self.links.read().unwrap().get(addr)
            && !link.is_closed()
        {
            return Ok(link.clone());
        }
        // Boxed: the connect's state would otherwise be part of every request's future.
        Box::pin(self.connect(addr)).await
    }

    async fn connect(&self, addr: &str) -> Result<Arc<Link>, ClientError> {
        let connect_error = |message: String| ClientError::Connect {
            addr: addr.to_string(),
            message,
        };
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error("connect timed out".into()))?
            .map_err(|e| connect_error(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_error(e.to_string()))?;
        let (rd, wr) = stream.into_split();
        let link = Arc::new(Link {
            outbox: Outbox::new(),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(0),
            abandoned: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        link.outbox.push(|out| out.put_slice(PREFACE));
        let writer = tokio::spawn(link.outbox.clone().run(wr)).abort_handle();
        let reader = tokio::spawn(read_answers(link.clone(), rd, addr.to_string())).abort_handle();
        *link.tasks.lock().unwrap() = vec![writer, reader];
        let mut links = self.links.write().unwrap();
        // Nodes that moved leave closed links behind; drop them here, where a new one is
        // made anyway.
        links.retain(|_, l| !l.is_closed());
        if let Some(raced) = links.get(addr) {
            // Requests that found no link connect at once; the first link made is kept,
            // and this one closes before it carried anything.
            link.fail_all();
            return Ok(raced.clone());
        }
        links.insert(addr.to_string(), link.clone());
        Ok(link)
    }
}

/// The caller's reader task of one link: hands each answer to the request waiting for it.
async fn read_answers(link: Arc<Link>, mut rd: OwnedReadHalf, addr: String) {
    let mut buf = BytesMut::with_capacity(BUFFER);
    let result: Result<(), String> = async {
        loop {
            while let Some(payload) = take_frame(&mut buf).map_err(|e| e.to_string())? {
                let (id, answer) = decode_response(payload).map_err(|e| e.to_string())?;
                if let Some(tx) = link.waiting.lock().unwrap().remove(&id) {
                    let _ = tx.send(answer);
                }
            }
            if rd.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed by the node".into());
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(node = %addr, reason = %e, "link closed");
    }
    link.fail_all();
}

// ---- the node's side ------------------------------------------------------------------

/// Serves `app` on `listener` until `shutdown` resolves: HTTP/1.1 and HTTP/2 to anyone,
/// and the link, told apart by their first bytes. Then it stops accepting and
/// returns once every request in progress has been answered. HTTP connections, and
/// connections that say nothing, are closed after `idle` without progress.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    idle: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let (stop_tx, stop) = watch::channel(false);
    let (http_tx, http_rx) = mpsc::channel(64);
    // Each link connection holds a clone; `recv` ends once all of them have drained.
    let (live_tx, mut live_rx) = mpsc::channel::<Infallible>(1);
    let acceptor = tokio::spawn(accept(
        listener,
        app.clone(),
        http_tx,
        stop.clone(),
        live_tx,
        idle,
    ));
    let http = crate::idle::IdleClosing::new(HttpConnections { rx: http_rx, local }, idle);
    let result = crate::idle::serve(http, app, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    acceptor.abort();
    let _ = acceptor.await;
    while live_rx.recv().await.is_some() {}
    result
}

/// Accepts connections, sends HTTP ones on to axum and serves link ones itself.
async fn accept(
    listener: TcpListener,
    app: axum::Router,
    http: mpsc::Sender<(TcpStream, SocketAddr)>,
    stop: watch::Receiver<bool>,
    live: mpsc::Sender<Infallible>,
    idle: Duration,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, http, mut stop, live) = (app.clone(), http.clone(), stop.clone(), live.clone());
        tokio::spawn(async move {
            let kind = tokio::select! {
                kind = is_link(&stream) => kind,
                // A connection that never says anything does not hold up shutdown, nor
                // its descriptor for ever.
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(idle) => return,
            };
            match kind {
                Ok(true) => {
                    serve_link(stream, app, stop).await;
                    drop(live);
                }
                Ok(false) => {
                    let _ = http.send((stream, peer)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "connection failed before its first bytes")
                }
            }
        });
    }
}

/// Whether the connection starts with [`PREFACE`]. Reads nothing: HTTP goes on intact.
async fn is_link(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; PREFACE.len()];
    // A preface split over packets shows up in pieces; give it a little time to complete.
    for _ in 0..200 {
        let n = stream.peek(&mut first).await?;
        if n == 0 || first[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(false)
}

/// axum's view of the listener: only the connections that speak HTTP.
struct HttpConnections {
    rx: mpsc::Receiver<(TcpStream, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for HttpConnections {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The acceptor is gone only at shutdown, when axum stops asking.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves one link connection. Its requests run through `app` together in this one task,
/// so the answers of everything that finishes at once (reads, mostly) leave in one write;
/// writes waiting for their commit stay in flight meanwhile. At `stop` it reads no more
/// and answers what it has.
async fn serve_link(stream: TcpStream, app: axum::Router, mut stop: watch::Receiver<bool>) {
    let peer = stream.peer_addr().ok();
    let (mut rd, wr) = stream.into_split();
    let outbox = Outbox::new();
    let writer = tokio::spawn(outbox.clone().run(wr));
    let mut answering = FuturesUnordered::new();
    let mut ready = BytesMut::with_capacity(BUFFER);
    let mut buf = BytesMut::with_capacity(BUFFER);
    let result: Result<(), String> = async {
        // The preface was only peeked.
        buf.resize(PREFACE.len(), 0);
        rd.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        buf.clear();
        loop {
            while answering.len() < MAX_IN_FLIGHT {
                let Some(payload) = take_frame(&mut buf).map_err(|e| e.to_string())? else {
                    break;
                };
                let req = decode_request(payload).map_err(|e| e.to_string())?;
                answering.push(answer(app.clone(), req));
            }
            tokio::select! {
                Some(first) = answering.next(), if !answering.is_empty() => {
                    put_answer(&mut ready, first);
                    while let Some(Some(more)) = answering.next().now_or_never() {
                        put_answer(&mut ready, more);
                    }
                    match outbox.push(|out| out.extend_from_slice(&ready)) {
                        Pushed::Queued => ready.clear(),
                        Pushed::Closed => return Ok(()),
                        Pushed::Full(n) => {
                            return Err(format!("the caller is not reading its answers ({n} bytes wait)"));
                        }
                    }
                }
                n = rd.read_buf(&mut buf), if answering.len() < MAX_IN_FLIGHT => {
                    if n.map_err(|e| e.to_string())? == 0 {
                        return Ok(());
                    }
                }
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(?peer, error = %e, "link connection dropped");
    }
    // Everything read gets its answer before the connection ends.
    while let Some(done) = answering.next().await {
        outbox.push(|out| put_answer(out, done));
    }
    outbox.close();
    let _ = writer.await;
}

fn put_answer(out: &mut BytesMut, (id, status, headers, body): Answer) {
    if let Err(e) = check_headers(headers.iter()) {
        // The caller must not act on an answer that lost a header; this one says so.
        tracing::error!(error = %e, "answer headers do not fit in a frame");
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        return put_response(out, id, status, &HeaderMap::new(), b"");
    }
    put_response(out, id, status, &headers, &body);
}

/// A request's id and the node's answer to it.
type Answer = (u32, StatusCode, HeaderMap, Bytes);

/// Runs one request through the node's app and buffers the answer.
async fn answer(mut app: axum::Router, req: Incoming) -> Answer {
    let id = req.id;
    let length = HeaderValue::from(req.body.len());
    let mut request = Request::new(Body::from(req.body));
    *request.method_mut() = req.method;
    *request.uri_mut() = req.target;
    *request.headers_mut() = req.headers;
    // As over HTTP, where the body's length always comes declared.
    request.headers_mut().insert(CONTENT_LENGTH, length);
    let response = match tower_service::Service::call(&mut app, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => (id, parts.status, parts.headers, body),
        Err(e) => {
            tracing::error!(error = %e, "answer body failed");
            (
                id,
                StatusCode::INTERNAL_SERVER_ERROR,
                HeaderMap::new(),
                Bytes::new(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_frame(id: u32, method: &Method, target: &str, body: &[u8]) -> BytesMut {
        let mut headers = HeaderMap::new();
        headers.insert(hyper::header::IF_MATCH, HeaderValue::from_static("\"1-2\""));
        let mut out = BytesMut::new();
        put_request(
            &mut out,
            id,
            &LinkRequest {
                method,
                target,
                headers: &headers,
                pass: &[hyper::header::IF_MATCH],
                body,
            },
        );
        out
    }

    #[test]
    fn a_request_survives_the_round_trip() {
        let mut buf = request_frame(7, &Method::PUT, "/v1/kv/a%20b?x=1", b"value");
        let payload = take_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let req = decode_request(payload).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(req.method, Method::PUT);
        assert_eq!(req.target, "/v1/kv/a%20b?x=1");
        assert_eq!(req.headers.get(hyper::header::IF_MATCH).unwrap(), "\"1-2\"");
        assert_eq!(req.headers.len(), 1);
        assert_eq!(&req.body[..], b"value");
    }

    #[test]
    fn repeated_headers_arrive_all_and_in_order() {
        let mut headers = HeaderMap::new();
        for v in ["\"1-4\"", "\"0-0\""] {
            headers.append(hyper::header::IF_MATCH, HeaderValue::from_static(v));
        }
        headers.append(hyper::header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        headers.append(
            hyper::header::IF_NONE_MATCH,
            HeaderValue::from_static("\"2-2\""),
        );
        headers.append(hyper::header::USER_AGENT, HeaderValue::from_static("curl"));
        let mut out = BytesMut::new();
        let pass = [hyper::header::IF_MATCH, hyper::header::IF_NONE_MATCH];
        let req = LinkRequest {
            method: &Method::DELETE,
            target: "/v1/kv/k",
            headers: &headers,
            pass: &pass,
            body: b"",
        };
        put_request(&mut out, 1, &req);
        let got = decode_request(take_frame(&mut out).unwrap().unwrap()).unwrap();
        for name in &pass {
            let sent: Vec<_> = headers.get_all(name).iter().collect();
            let arrived: Vec<_> = got.headers.get_all(name).iter().collect();
            assert_eq!(arrived, sent, "{name}");
        }
        // Only the names passed go.
        assert_eq!(got.headers.len(), 4);
    }

    /// A DELETE sending the `If-Match` values of `headers`.
    fn delete_if_match<'a>(headers: &'a HeaderMap) -> LinkRequest<'a> {
        static PASS: [HeaderName; 1] = [hyper::header::IF_MATCH];
        LinkRequest {
            method: &Method::DELETE,
            target: "/v1/kv/k",
            headers,
            pass: &PASS,
            body: b"",
        }
    }

    fn if_match(values: impl IntoIterator<Item = String>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            let v = HeaderValue::from_str(&v).unwrap();
            headers.append(hyper::header::IF_MATCH, v);
        }
        headers
    }

    #[test]
    fn headers_that_do_not_fit_a_frame_are_an_error_not_left_out() {
        let long = format!("\"0-0\"{},\"9-9\"", " ".repeat(70_000));
        let headers = if_match(["\"0-0\"".to_string(), long.clone()]);
        assert_eq!(
            delete_if_match(&headers).check(),
            Err(HeaderError::ValueTooLong {
                name: hyper::header::IF_MATCH,
                len: long.len()
            })
        );
        // The longest value a frame holds goes whole.
        let longest = format!("\"0-0\"{}", " ".repeat(usize::from(u16::MAX) - 5));
        let headers = if_match([longest.clone()]);
        let req = delete_if_match(&headers);
        assert_eq!(req.check(), Ok(()));
        let mut out = BytesMut::new();
        put_request(&mut out, 1, &req);
        let got = decode_request(take_frame(&mut out).unwrap().unwrap()).unwrap();
        assert_eq!(got.headers[hyper::header::IF_MATCH], longest.as_str());
        // As many values as the count holds, and one more.
        let values = |n: usize| if_match((0..n).map(|i| format!("\"0-{i}\"")));
        assert_eq!(delete_if_match(&values(255)).check(), Ok(()));
        assert_eq!(
            delete_if_match(&values(256)).check(),
            Err(HeaderError::TooMany(256))
        );
    }

    #[tokio::test]
    async fn a_request_whose_headers_do_not_fit_is_not_sent() {
        let (addr, _server) = echo_node().await;
        let headers = if_match(["x".repeat(70_000)]);
        let links = Links::default();
        let err = links
            .send(&addr, delete_if_match(&headers), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Encode(_)), "{err:?}");
        // Not even a connection was made for it.
        assert!(links.links.read().unwrap().is_empty());
    }

    #[test]
    fn an_answer_whose_headers_do_not_fit_is_a_500() {
        let mut headers = HeaderMap::new();
        let etag = HeaderValue::from_str(&"x".repeat(70_000)).unwrap();
        headers.insert(hyper::header::ETAG, etag);
        let mut buf = BytesMut::new();
        put_answer(
            &mut buf,
            (3, StatusCode::OK, headers, Bytes::from_static(b"v")),
        );
        let (id, resp) = decode_response(take_frame(&mut buf).unwrap().unwrap()).unwrap();
        assert_eq!((id, resp.status), (3, StatusCode::INTERNAL_SERVER_ERROR));
        assert!(resp.headers.is_empty() && resp.body.is_empty());
    }

    #[test]
    fn a_response_survives_the_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(hyper::header::ETAG, HeaderValue::from_static("\"3-9\""));
        headers.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        let mut buf = BytesMut::new();
        put_response(&mut buf, u32::MAX, StatusCode::CREATED, &headers, b"");
        let (id, resp) = decode_response(take_frame(&mut buf).unwrap().unwrap()).unwrap();
        assert_eq!(id, u32::MAX);
        assert_eq!(resp.status, StatusCode::CREATED);
        assert_eq!(resp.headers, headers);
        assert!(resp.body.is_empty());
    }

    #[test]
    fn frames_are_taken_only_when_whole_and_in_order() {
        let mut stream = request_frame(1, &Method::GET, "/get?key=a", b"");
        stream.extend_from_slice(&request_frame(2, &Method::POST, "/put", b"{}"));
        let whole = stream.clone();
        // Fed a byte at a time, exactly the two frames come out, each when complete.
        let mut buf = BytesMut::new();
        let mut ids = Vec::new();
        for (i, b) in whole.iter().enumerate() {
            buf.put_u8(*b);
            while let Some(p) = take_frame(&mut buf).unwrap() {
                ids.push((i, decode_request(p).unwrap().id));
            }
        }
        let first_len = request_frame(1, &Method::GET, "/get?key=a", b"").len();
        assert_eq!(ids, vec![(first_len - 1, 1), (whole.len() - 1, 2)]);
    }

    #[test]
    fn room_for_a_frame_grows_as_it_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32);
        buf.put_slice(b"12345678");
        assert_eq!(take_frame(&mut buf), Ok(None));
        assert!(
            buf.capacity() <= 2 * BUFFER,
            "{} bytes reserved",
            buf.capacity()
        );
    }

    #[test]
    fn an_outbox_refuses_frames_beyond_its_limit() {
        let outbox = Outbox::new();
        let mib = vec![7u8; 1 << 20];
        let mut queued = 0;
        while outbox.push(|out| out.put_slice(&mib)) == Pushed::Queued {
            queued += 1;
        }
        assert_eq!(queued, MAX_QUEUED >> 20);
        assert_eq!(outbox.push(|_| {}), Pushed::Full(MAX_QUEUED));
        outbox.close();
        assert_eq!(outbox.push(|_| {}), Pushed::Closed);
    }

    #[test]
    fn malformed_frames_are_refused() {
        let whole = request_frame(1, &Method::GET, "/v1/kv/k", b"");
        // Every cut inside the header fields is a truncation, never a panic.
        for cut in 4..whole.len() {
            let payload = Bytes::copy_from_slice(&whole[4..cut]);
            assert!(
                matches!(decode_request(payload), Err(FrameError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut big = BytesMut::new();
        big.put_u32(MAX_FRAME as u32 + 1);
        assert_eq!(
            take_frame(&mut big),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        let absolute = request_frame(1, &Method::GET, "http://elsewhere/v1/kv/k", b"");
        let payload = Bytes::copy_from_slice(&absolute[4..]);
        assert_eq!(
            decode_request(payload).unwrap_err(),
            FrameError::Invalid("target")
        );
        let mut bad_method = BytesMut::new();
        bad_method.put_u32(1);
        put_short(&mut bad_method, b"GE T");
        assert_eq!(
            decode_request(bad_method.freeze()).unwrap_err(),
            FrameError::Invalid("method")
        );
    }

    #[test]
    fn a_request_to_a_node_is_a_small_future() {
        // The router allocates and moves one of these per request; a connect inlined
        // into it once made it several kilobytes.
        let links = Links::default();
        let req = LinkRequest {
            method: &Method::GET,
            target: "/",
            headers: no_headers(),
            pass: &[],
            body: b"",
        };
        let size = std::mem::size_of_val(&links.send("127.0.0.1:1", req, Duration::from_secs(1)));
        assert!(size <= 1024, "Links::send future is {size} bytes");
    }

    /// A node that answers each request with its target, in reverse order of arrival.
    async fn echo_node() -> (String, tokio::task::JoinHandle<()>) {
        let (listener, addr) = bound().await;
        let app = axum::Router::new().fallback(|uri: Uri, body: Bytes| async move {
            if uri.path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            format!("{} {}", uri, body.len())
        });
        let server = tokio::spawn(async move {
            serve(
                listener,
                app,
                crate::idle::DEFAULT_IDLE,
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        (addr, server)
    }

    /// A listener on a free loopback port, and its address.
    async fn bound() -> (TcpListener, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (listener, addr)
    }

    /// Whether the link to `addr` has no request left waiting for an answer.
    fn nothing_waiting(links: &Links, addr: &str) -> bool {
        links.links.read().unwrap()[addr]
            .waiting
            .lock()
            .unwrap()
            .is_empty()
    }

    /// Serves a real node on `listener` (the port of one that broke or was given up on)
    /// and checks that `links` reaches it: the old link was replaced.
    async fn reaches_a_new_node(links: &Links, addr: &str, listener: TcpListener) {
        let app = axum::Router::new().fallback(|| async { "back" });
        tokio::spawn(serve(
            listener,
            app,
            crate::idle::DEFAULT_IDLE,
            std::future::pending(),
        ));
        let resp = links
            .send(addr, get("/"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(resp.body, "back");
    }

    /// Established connections the listener at `addr` holds, read from /proc/net/tcp.
    fn echo_connections(addr: &str) -> usize {
        let port = addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let local = format!(":{port:04X}");
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f[1].ends_with(&local) && f[3] == "01"
            })
            .count()
    }

    fn get<'a>(target: &'a str) -> LinkRequest<'a> {
        LinkRequest {
            method: &Method::GET,
            target,
            headers: no_headers(),
            pass: &[],
            body: b"",
        }
    }

    #[tokio::test]
    async fn answers_find_their_requests_whatever_their_order() {
        let (addr, _server) = echo_node().await;
        let links = Arc::new(Links::default());
        let slow = {
            let (links, addr) = (links.clone(), addr.clone());
            tokio::spawn(async move {
                links
                    .send(&addr, get("/slow"), Duration::from_secs(5))
                    .await
            })
        };
        let mut fast = Vec::new();
        for i in 0..200 {
            let (links, addr) = (links.clone(), addr.clone());
            fast.push(tokio::spawn(async move {
                let target = format!("/k/{i}");
                let body = vec![b'x'; i];
                let req = LinkRequest {
                    method: &Method::PUT,
                    target: &target,
                    headers: no_headers(),
                    pass: &[],
                    body: &body,
                };
                let resp = links
                    .send(&addr, req, Duration::from_secs(5))
                    .await
                    .unwrap();
                assert_eq!(resp.status, StatusCode::OK);
                assert_eq!(resp.body, format!("/k/{i} {i}"));
            }));
        }
        for f in fast {
            f.await.unwrap();
        }
        // However many requests raced to connect, one connection stays open.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(echo_connections(&addr), 1);
        let slow = slow.await.unwrap().unwrap();
        assert_eq!(slow.body, "/slow 0");
        // One connection carried them all.
        assert_eq!(links.links.read().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_same_port_still_speaks_http() {
        let (addr, _server) = echo_node().await;
        let http = crate::client::HttpClient::new();
        let resp = http
            .get(&addr, "/over/http", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.body, "/over/http 0");
    }

    #[tokio::test]
    async fn a_node_that_is_not_there_is_a_connect_error() {
        let (listener, addr) = bound().await;
        drop(listener);
        let err = Links::default()
            .send(&addr, get("/"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_node_that_dies_mid_request_fails_it_and_the_next_one_reconnects() {
        let (listener, addr) = bound().await;
        // Takes the connection and the request, then hangs up without an answer.
        let node = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 16];
            s.read_exact(&mut first).await.unwrap();
            assert_eq!(&first[..8], PREFACE);
            drop(s);
            listener
        });
        let links = Links::default();
        let err = links
            .send(&addr, get("/"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
        assert!(nothing_waiting(&links, &addr));
        // A real node on the same port now: the broken link is replaced.
        let listener = node.await.unwrap();
        reaches_a_new_node(&links, &addr, listener).await;
    }

    #[tokio::test]
    async fn a_silent_node_times_out_and_leaves_nothing_waiting() {
        let (listener, addr) = bound().await;
        let _hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        let links = Links::default();
        let err = links
            .send(&addr, get("/"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
        assert!(nothing_waiting(&links, &addr));
    }

    #[tokio::test]
    async fn an_abandoned_node_fails_what_it_holds_and_the_next_request_reconnects() {
        let (listener, addr) = bound().await;
        // Takes the connection and never answers, like a stopped process; hands the
        // listener back once the caller hung up, for a real node to take over the port.
        let silent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            listener
        });
        let links = Arc::new(Links::default());
        let held = tokio::spawn({
            let (links, addr) = (links.clone(), addr.clone());
            async move { links.send(&addr, get("/"), Duration::from_secs(30)).await }
        });
        while !links.links.read().unwrap().contains_key(&addr) || nothing_waiting(&links, &addr) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(links.abandon(&addr), 1);
        let err = held.await.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Abandoned(_)), "{err:?}");
        // The connection was closed, not left to the silent peer.
        let listener = tokio::time::timeout(Duration::from_secs(5), silent)
            .await
            .expect("the abandoned connection is closed")
            .unwrap();
        reaches_a_new_node(&links, &addr, listener).await;
        // A link with nothing waiting is kept: its node may serve as a follower.
        assert_eq!(links.abandon(&addr), 0);
        assert_eq!(links.links.read().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn garbage_after_the_preface_closes_only_that_connection() {
        let (addr, _server) = echo_node().await;
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
        let mut rest = Vec::new();
        // The node hangs up (end of stream) instead of answering or hanging.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the node closes the connection")
            .unwrap();
        assert_eq!(n, 0);
        let resp = Links::default()
            .send(&addr, get("/still/fine"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(resp.body, "/still/fine 0");
    }

    #[tokio::test]
    async fn shutdown_answers_what_was_read_before_closing() {
        let (listener, addr) = bound().await;
        let app = axum::Router::new().fallback(|| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "finished"
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            app,
            crate::idle::DEFAULT_IDLE,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let links = Arc::new(Links::default());
        let call = {
            let (links, addr) = (links.clone(), addr.clone());
            tokio::spawn(async move { links.send(&addr, get("/"), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(()).unwrap();
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.body, "finished");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after draining")
            .unwrap()
            .unwrap();
    }
}
