//! The public HTTP API shared by nodes and routers: request parsing, limits, and errors
//! as `{"error": {"code", "message"}}`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::budget::{BodyBudget, Held, UNCOUNTED};
use crate::storage::{Condition, Position};

/// The highest key limit a node or router takes: a key travels in the URL, which the
/// HTTP layer refuses beyond 64 KiB.
pub const MAX_KEY_LIMIT: usize = 32 << 10;

/// The highest value limit a node or router takes: a value is one request in memory at
/// every hop, and a link queues at most 64 MiB for a node.
pub const MAX_VALUE_LIMIT: usize = 64 << 20;

/// Size limits enforced before anything is stored.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Largest JSON body of the demo `POST /put`: a value and a key, every byte of them
    /// escaped (`\u00e9` is six bytes for two of UTF-8, a control byte six for one), and
    /// room for the rest.
    pub fn max_json_bytes(&self) -> usize {
        6 * (self.max_value_bytes + self.max_key_bytes) + 1024
    }

    /// The room for request bodies a process with these limits holds at once.
    pub fn body_budget(&self) -> BodyBudget {
        BodyBudget::for_bodies_up_to(self.max_json_bytes())
    }
}

/// An error answer. Serialized as `{"error": {"code", "message", ...}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Seconds after which a retry may succeed (503).
    pub retry_after: Option<u64>,
    /// Epoch the replica is at (stale epoch, not leader).
    pub epoch: Option<u64>,
    /// Address of the leader, when a replica knows it (not leader).
    pub leader: Option<String>,
    /// The request body was left unread, so the connection cannot carry another request.
    pub close_connection: bool,
}

/// Body of an error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Details of an error.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `value_too_large`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Epoch the replica is at, for `stale_epoch` and `not_leader`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Leader address a replica knows of, for `not_leader`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            epoch: None,
            leader: None,
            close_connection: false,
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503 with `Retry-After: 1`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        e.retry_after = Some(1);
        e
    }

    /// 404 for a missing key.
    pub fn key_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "key not found")
    }

    /// 412 for a failed precondition.
    pub fn precondition_failed() -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            "the key's current version does not match the request's precondition",
        )
    }

    /// 409: the request carried an epoch older than the replica's.
    pub fn stale_epoch(request: u64, current: u64) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "stale_epoch",
            format!("epoch {request} is stale; this replica is at epoch {current}"),
        );
        e.epoch = Some(current);
        e
    }

    /// 421: this replica does not lead the shard (the router refreshes and retries).
    pub fn not_leader(epoch: u64, leader: Option<String>) -> Self {
        let mut e = Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            "not_leader",
            "this replica is not the shard's leader",
        );
        e.epoch = Some(epoch);
        e.leader = leader;
        e
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                epoch: self.epoch,
                leader: self.leader.clone(),
            },
        }
    }

    /// The same error in the demo API's shape, `{"status": message}`.
    pub fn into_demo(self) -> Response {
        let body = serde_json::json!({ "status": self.message });
        let mut resp = (self.status, axum::Json(body)).into_response();
        add_headers(&mut resp, &self);
        resp
    }
}

fn add_headers(resp: &mut Response, e: &ApiError) {
    if let Some(s) = e.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if e.close_connection {
        // Tell the client, so its pool does not send the next request down a connection
        // the server is about to close.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        add_headers(&mut resp, &self);
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

/// Reads `error.epoch` out of an error body, if there is one.
pub fn epoch_in_error(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<ErrorBody>(body).ok()?.error.epoch
}

/// Reads `error.leader` out of an error body, if there is one.
pub fn leader_in_error(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(body).ok()?.error.leader
}

/// Checks a key: not empty, not too long.
pub fn check_key(key: &[u8], limits: &Limits) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "empty_key",
            "the key must not be empty",
        ));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "key_too_large",
            format!(
                "the key is {} bytes; the limit is {}",
                key.len(),
                limits.max_key_bytes
            ),
        ));
    }
    Ok(())
}

/// The key of a `/v1/kv/{key}` path, percent-decoded (keys are bytes; `/` is allowed).
pub fn key_from_path(path: &str, limits: &Limits) -> Result<Bytes, ApiError> {
    let raw = path.strip_prefix("/v1/kv/").unwrap_or("");
    let key: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    check_key(&key, limits)?;
    Ok(Bytes::from(key))
}

/// The bytes of a query parameter, decoded by the form rules (`+` is a space, `%XX` a
/// byte). Bytes, not text: a lossy conversion would turn different keys into one.
pub fn query_param(query: Option<&str>, name: &str) -> Option<Vec<u8>> {
    let decode = |s: &str| -> Vec<u8> {
        percent_encoding::percent_decode_str(&s.replace('+', " ")).collect()
    };
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name.as_bytes()).then(|| decode(v))
    })
}

/// Whether the request asks for `consistency=stale`.
pub fn wants_stale(query: Option<&str>) -> Result<bool, ApiError> {
    match query_param(query, "consistency").as_deref() {
        None => Ok(false),
        Some(b"stale") => Ok(true),
        // Read as the default, a misspelt `stale` would quietly cost the leader's wait.
        Some(other) => Err(ApiError::bad_request(
            "invalid_consistency",
            format!(
                "consistency must be stale (or left out, for a read the leader answers), not {:?}",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}

/// The write precondition from `If-Match` / `If-None-Match`.
pub fn condition(headers: &HeaderMap) -> Result<Condition, ApiError> {
    let bad = |message: String| ApiError::bad_request("invalid_precondition", message);
    // One header with one value: a store with one version per key has nothing to match a
    // list against, and a second header must not be ignored silently.
    let single = |name: &header::HeaderName| -> Result<Option<&str>, ApiError> {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(bad(format!("send one {name} header, not several")));
        }
        let text = value
            .to_str()
            .map_err(|_| bad(format!("{name} is not valid text")))?;
        Ok(Some(text.trim()))
    };
    match (single(&header::IF_MATCH)?, single(&header::IF_NONE_MATCH)?) {
        (Some(_), Some(_)) => Err(bad("use either If-Match or If-None-Match, not both".into())),
        (Some("*"), None) => Ok(Condition::IfExists),
        (Some(v), None) => match strong_etag(v) {
            Some(version) => Ok(Condition::IfMatch(version)),
            // Well formed, but no version distkv issues looks like it: it matches none.
            None if is_strong_tag(v) => Err(ApiError::precondition_failed()),
            None => Err(bad(format!(
                "If-Match must be one strong ETag such as \"1-42\", or *; got {}",
                excerpt(v)
            ))),
        },
        (None, Some("*")) => Ok(Condition::IfAbsent),
        (None, Some(_)) => Err(bad("If-None-Match supports only * (create-only)".into())),
        (None, None) => Ok(Condition::None),
    }
}

/// A strong ETag as distkv issues them: `"epoch-seq"`, quotes included. A weak one
/// (`W/"…"`) never matches for `If-Match` (RFC 9110), so it is refused, not compared.
fn strong_etag(v: &str) -> Option<Position> {
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    // Digits and the dash only: what `Position::parse_etag` would tolerate around them
    // (spaces, `W/`, more quotes, a `+`) is not an ETag distkv issued.
    let plain = inner.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    plain.then(|| Position::parse_etag(inner)).flatten()
}

/// Whether `v` is one strong entity tag as HTTP defines it: quoted, no quotes or spaces
/// inside (RFC 9110, section 8.8.3).
fn is_strong_tag(v: &str) -> bool {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .is_some_and(|inner| {
            inner
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
        })
}

/// The start of a client's text, for an error message that must stay short.
fn excerpt(v: &str) -> String {
    const MAX: usize = 64;
    match v.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &v[..cut]),
        None => v.to_owned(),
    }
}

/// The slowest a request body may arrive, on average, after [`BODY_GRACE`]. A client
/// sending a byte now and then is never idle, and would hold its connection, and the
/// room its body takes in the [`BodyBudget`], for as long as the body may be.
pub const BODY_MIN_RATE: usize = 16 << 10;

/// Time a body gets on top of what [`BODY_MIN_RATE`] allows.
pub const BODY_GRACE: Duration = Duration::from_secs(5);

/// A refused body up to this size is read and thrown away before the 413 goes out, so the
/// client, still sending, reads the answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 8 << 20;

/// Reads a request body of at most `limit` bytes, answering 413 beyond. A declared
/// oversized body is drained when it is at most [`DRAIN_LIMIT`] and the connection stays
/// open; a larger or undeclared one is left unread and the answer closes the connection.
/// The body holds room in `budget` until the returned [`Held`] is dropped; 503
/// `server_busy` if none comes free in time. 408 `body_too_slow` for a body arriving
/// slower than [`BODY_MIN_RATE`] after [`BODY_GRACE`], which closes the connection.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    what: &str,
    budget: &BodyBudget,
) -> Result<(Bytes, Held), ApiError> {
    let too_large = |len: Option<u64>, close: bool| {
        let size = match len {
            Some(l) => format!("{l} bytes"),
            None => format!("more than {limit} bytes"),
        };
        let mut e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            if what == "value" {
                "value_too_large"
            } else {
                "body_too_large"
            },
            format!("the {what} is {size}; the limit is {limit} bytes"),
        );
        e.close_connection = close;
        e
    };
    if let Some(coding) = unsupported_coding(headers) {
        // The HTTP layer undoes only `chunked`: a body under `gzip, chunked` would be
        // stored still compressed.
        let mut e = ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported_transfer_encoding",
            format!(
                "transfer coding {coding:?} is not supported; send the body as it is, or chunked"
            ),
        );
        e.close_connection = true;
        return Err(e);
    }
    let declared = declared_length(headers);
    if let Some(len) = declared
        && len > limit as u64
    {
        // A client that waits for `100 Continue` sends nothing after this answer: reading
        // would ask it for the very body being refused.
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let drained = !waits && len <= DRAIN_LIMIT && drain(body).await;
        return Err(too_large(Some(len), !drained));
    }
    let invalid = |e: axum::Error| {
        // A broken chunked encoding, or a client that went away mid-body.
        let mut e = ApiError::bad_request(
            "invalid_body",
            format!("the request body could not be read: {e}"),
        );
        e.close_connection = true;
        e
    };
    let full = |e: crate::budget::Full| {
        let mut e = ApiError::unavailable("server_busy", e.to_string());
        e.close_connection = true;
        e
    };
    let too_slow = || {
        let mut e = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_too_slow",
            format!(
                "the {what} came slower than {} KiB/s after the first {} s",
                BODY_MIN_RATE >> 10,
                BODY_GRACE.as_secs()
            ),
        );
        e.close_connection = true;
        e
    };
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    // Taken when the body first has to be waited for: not on the path of one that has not.
    let mut started = None;
    let mut held = Held::default();
    // One frame is the whole body in most requests: it is kept as it came, not copied.
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let (mut len, mut taken) = (0, 0);
    loop {
        // Most bodies are here with their headers: a timer only for one that is not.
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                let started = *started.get_or_insert_with(tokio::time::Instant::now);
                let total = declared.map_or(len, |d| d as usize).max(len);
                let due = started
                    + BODY_GRACE
                    + Duration::from_secs_f64(total as f64 / BODY_MIN_RATE as f64);
                tokio::time::timeout_at(due, body.frame())
                    .await
                    .map_err(|_| too_slow())?
            }
        };
        let Some(frame) = next else { break };
        let Ok(data) = frame.map_err(invalid)?.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > limit {
            return Err(too_large(declared, true));
        }
        let need = len.saturating_sub(UNCOUNTED);
        if need > taken {
            // A declared body takes room for all of it at once: bodies that each held
            // part of theirs could wait for each other until all were refused.
            let want = match declared {
                Some(d) if taken == 0 => (d as usize).saturating_sub(UNCOUNTED).max(need),
                _ => need,
            };
            budget.take(want - taken, &mut held).await.map_err(full)?;
            taken = want;
        }
        match &mut joined {
            Some(all) => all.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                first = Bytes::new();
                joined = Some(all);
            }
        }
    }
    let bytes = joined.map_or(first, BytesMut::freeze);
    Ok((bytes, held))
}

/// A transfer coding other than `chunked`, if the request declares one.
fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|c| !c.eq_ignore_ascii_case(b"chunked"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// The body's length as its `Content-Length` declares it.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body to its end without keeping it; false if it broke off.
async fn drain(mut body: Body) -> bool {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return false;
        }
    }
    true
}

/// The demo API's `POST /put` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DemoPut {
    /// The key.
    pub key: String,
    /// The value (a string).
    pub value: String,
}

/// Parses a demo `POST /put` body, with the demo's error shape for bad input.
pub fn parse_demo_put(body: &[u8], limits: &Limits) -> Result<DemoPut, ApiError> {
    let put: DemoPut = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("Invalid request: expected JSON {{\"key\": string, \"value\": string}}: {e}"),
        )
    })?;
    check_key(put.key.as_bytes(), limits)?;
    if put.value.len() > limits.max_value_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            format!(
                "the value is {} bytes; the limit is {} bytes",
                put.value.len(),
                limits.max_value_bytes
            ),
        ));
    }
    Ok(put)
}

/// The demo API's `key` query parameter, checked. The demo's keys are text, so one that
/// is not UTF-8 is refused rather than read as some other key.
pub fn demo_key(query: Option<&str>, limits: &Limits) -> Result<Bytes, ApiError> {
    let key = query_param(query, "key")
        .ok_or_else(|| ApiError::bad_request("missing_key", "Missing key: use ?key=NAME"))?;
    if std::str::from_utf8(&key).is_err() {
        return Err(ApiError::bad_request(
            "invalid_key",
            "the demo API takes text keys and this one is not valid UTF-8; binary keys go through /v1/kv/",
        ));
    }
    check_key(&key, limits)?;
    Ok(Bytes::from(key))
}

/// A key as text for a JSON answer: itself when it is UTF-8, else percent-encoded, so
/// different keys never read the same.
pub fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            percent_encoding::percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string()
        }
    }
}

/// `/v1/kv/` with nothing after it: the key is empty, whatever the method.
pub async fn empty_key(headers: HeaderMap, body: Body) -> ApiError {
    let mut e = ApiError::bad_request("empty_key", "the key must not be empty");
    // A body of moderate size is read and dropped, as for a value too large, so the
    // client reads this answer and keeps its connection.
    let drained = match declared_length(&headers) {
        Some(len) => len <= DRAIN_LIMIT && drain(body).await,
        None => !headers.contains_key(header::TRANSFER_ENCODING),
    };
    e.close_connection = !drained;
    e
}

/// `/v1/kv/` with no key: the methods of `/v1/kv/{key}` answer 400 `empty_key`, others 405.
pub fn empty_key_route<S: Clone + Send + Sync + 'static>() -> axum::routing::MethodRouter<S> {
    axum::routing::get(empty_key)
        .put(empty_key)
        .delete(empty_key)
}

/// The demo's `/delete` for `GET` and `DELETE`. A `GET` there deletes, so `HEAD`, which
/// must change nothing and which axum would otherwise hand to the `GET` handler, is 405.
pub fn demo_delete_route<H, T, S>(handler: H) -> axum::routing::MethodRouter<S>
where
    H: axum::handler::Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    axum::routing::get(handler.clone())
        .delete(handler)
        .head(head_of_a_delete)
}

async fn head_of_a_delete() -> Response {
    let mut resp = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "HEAD is not allowed on /delete: a GET there deletes the key",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET,DELETE"));
    resp
}

/// The 404 JSON answer for unknown routes.
pub async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!("no route {}", uri.path()),
    )
}

/// The 405 JSON answer for a known route with the wrong method.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A raw-bytes answer with an `ETag`.
pub fn value_response(version: Position, value: Bytes) -> Response {
    let mut resp = Response::new(Body::from(value));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ETAG, etag_header(version));
    resp
}

/// The `ETag` header value of a version.
pub fn etag_header(version: Position) -> HeaderValue {
    HeaderValue::from_str(&version.etag()).expect("etag is ascii")
}

/// Whether a read's `If-None-Match` names `version` (or is `*`): the client's copy is
/// current. Weak tags compare equal to strong ones here, as HTTP says for this header.
pub fn not_modified(headers: &HeaderMap, version: Position) -> bool {
    // Parsed, not compared as text: every GET passes here, most without the header.
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| {
            tag == "*" || strong_etag(tag.strip_prefix("W/").unwrap_or(tag)) == Some(version)
        })
}

/// 304: the client's copy is current; its version, no body.
pub fn not_modified_response(version: Position) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    resp.headers_mut()
        .insert(header::ETAG, etag_header(version));
    resp
}

/// Answer to a v1 PUT.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PutResult {
    /// The key written; percent-encoded when it is not UTF-8.
    pub key: String,
    /// Its new version (the ETag without quotes).
    pub version: String,
    /// Whether the key was created.
    pub created: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_decoded_and_checked() {
        let l = Limits::default();
        assert_eq!(
            key_from_path("/v1/kv/a%2Fb", &l).unwrap(),
            Bytes::from("a/b")
        );
        assert_eq!(key_from_path("/v1/kv/a/b", &l).unwrap(), Bytes::from("a/b"));
        assert_eq!(key_from_path("/v1/kv/", &l).unwrap_err().code, "empty_key");
        let long = format!("/v1/kv/{}", "k".repeat(1025));
        let e = key_from_path(&long, &l).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (413, "key_too_large"));
    }

    #[test]
    fn a_read_is_not_modified_when_it_names_the_current_version() {
        let v = Position::new(3, 17);
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_static(value));
            not_modified(&h, v)
        };
        assert!(!not_modified(&HeaderMap::new(), v));
        assert!(with("\"3-17\""));
        assert!(with("W/\"3-17\""));
        assert!(with("\"1-1\", \"3-17\""));
        assert!(with("*"));
        assert!(!with("\"3-16\""));
        assert!(!with("3-17"));
    }

    #[test]
    fn preconditions_parse() {
        let mut h = HeaderMap::new();
        assert_eq!(condition(&h).unwrap(), Condition::None);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"3-17\""));
        assert_eq!(
            condition(&h).unwrap(),
            Condition::IfMatch(Position::new(3, 17))
        );
        // Well-formed ETags distkv never issued match no version.
        for foreign in ["\"abc\"", "\"+3-17\"", "\"3-17-1\"", "\"\""] {
            h.insert(header::IF_MATCH, HeaderValue::from_str(foreign).unwrap());
            assert_eq!(
                condition(&h).unwrap_err().code,
                "precondition_failed",
                "{foreign}"
            );
        }
        for bad in [
            "nonsense",
            "3-17",
            "\"3-17",
            "W/\"3-17\"",
            "\"\"3-17\"\"",
            "\"3 17\"",
        ] {
            h.insert(header::IF_MATCH, HeaderValue::from_str(bad).unwrap());
            assert_eq!(
                condition(&h).unwrap_err().code,
                "invalid_precondition",
                "{bad}"
            );
        }
        // Several values are refused however they are sent: one header or two.
        h.insert(
            header::IF_MATCH,
            HeaderValue::from_static("\"0-0\", \"3-17\""),
        );
        assert_eq!(condition(&h).unwrap_err().code, "invalid_precondition");
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"0-0\""));
        h.append(header::IF_MATCH, HeaderValue::from_static("\"3-17\""));
        assert_eq!(condition(&h).unwrap_err().code, "invalid_precondition");
        // A huge value is not echoed back whole.
        h.insert(
            header::IF_MATCH,
            HeaderValue::from_str(&"x".repeat(100_000)).unwrap(),
        );
        assert!(condition(&h).unwrap_err().message.len() < 200);
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert_eq!(condition(&h).unwrap(), Condition::IfAbsent);
    }

    #[test]
    fn demo_keys_are_text_and_never_another_key() {
        let l = Limits::default();
        assert_eq!(
            demo_key(Some("key=a+b%2Fc"), &l).unwrap(),
            Bytes::from("a b/c")
        );
        assert_eq!(
            demo_key(Some("x=1&key=%E2%82%AC"), &l).unwrap(),
            Bytes::from("€")
        );
        // 0xFF is not UTF-8: refused, where a lossy decoding made it U+FFFD, a real key.
        assert_eq!(
            demo_key(Some("key=%FF"), &l).unwrap_err().code,
            "invalid_key"
        );
        assert_eq!(demo_key(Some("k=1"), &l).unwrap_err().code, "missing_key");
        assert!(wants_stale(Some("key=a&consistency=stale")).unwrap());
        assert!(!wants_stale(Some("key=a")).unwrap());
        assert!(!wants_stale(None).unwrap());
        for bad in ["consistency=stal%FF", "consistency=STALE", "consistency="] {
            let code = wants_stale(Some(bad)).unwrap_err().code;
            assert_eq!(code, "invalid_consistency", "{bad}");
        }
        assert_eq!(key_text(b"plain"), "plain");
        assert_ne!(key_text(&[0xFF]), key_text(&[0xFE]));
        assert_ne!(key_text(&[0xFF]), key_text("\u{FFFD}".as_bytes()));
    }

    #[test]
    fn demo_put_rejects_bad_json_and_missing_fields() {
        let l = Limits::default();
        assert_eq!(parse_demo_put(b"{", &l).unwrap_err().code, "invalid_json");
        assert_eq!(
            parse_demo_put(br#"{"key":"a"}"#, &l).unwrap_err().code,
            "invalid_json"
        );
        assert_eq!(
            parse_demo_put(br#"{"key":"","value":"v"}"#, &l)
                .unwrap_err()
                .code,
            "empty_key"
        );
        assert_eq!(
            parse_demo_put(br#"{"key":"a","value":"v"}"#, &l)
                .unwrap()
                .value,
            "v"
        );
    }

    #[test]
    fn etags_round_trip() {
        let p = Position::new(4, 99);
        assert_eq!(Position::parse_etag(&p.etag()), Some(p));
        assert_eq!(Position::parse_etag("W/\"4-99\""), Some(p));
        assert_eq!(Position::parse_etag("4"), None);
    }
}
