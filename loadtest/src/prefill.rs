//! Writes every key of a keyspace once, so that reads hit and memory can be measured.

use crate::attack::error_chain;
use crate::keys::{key_name, make_value};
use crate::scenario::v1_path;
use reqwest::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A prefill that did not write every key.
#[derive(Debug, Error)]
pub enum PrefillError {
    /// The HTTP client could not be built.
    #[error("building HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The first writes could not connect: nothing listens there, or not yet.
    #[error("cannot connect to {host}: {error}; is the router running and is --host right?")]
    Unreachable {
        /// The host from `--host`.
        host: String,
        /// The connection error, with its causes.
        error: String,
    },
    /// The server refused a write as a bad request (4xx); the same write would be refused
    /// again, so nothing was retried and the other writes were stopped.
    #[error("PUT {url} was rejected with HTTP {status}: {message}")]
    Rejected {
        /// The key's URL.
        url: String,
        /// Status, e.g. `413 Payload Too Large`.
        status: StatusCode,
        /// What the server said.
        message: String,
    },
    /// Some keys could not be written, even after retries.
    #[error("{failed} of {total} keys could not be written; first error: {first}")]
    Failed {
        /// Keys not written.
        failed: u64,
        /// Keys attempted.
        total: u64,
        /// The first error seen.
        first: String,
    },
}

/// What to write and how hard.
#[derive(Debug, Clone)]
pub struct PrefillOptions {
    /// Base URL of the router.
    pub host: String,
    /// Keys `0..keys` are written.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// Outcome of a successful prefill.
#[derive(Debug, Clone, Copy)]
pub struct PrefillReport {
    /// Keys written.
    pub keys: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Attempts per key: a 503 while in-sync replicas catch up is transient, anything that
/// keeps failing is reported.
const ATTEMPTS: u32 = 5;

/// How long to wait before attempt `attempt` (from 1) of a key.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt)
}

/// Whether a write answered with `status` would fail the same way when retried: a 4xx
/// says the request itself is wrong (too large, bad key), except for the two that ask to
/// come back later.
pub fn is_permanent(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// The message in an error body: distkv's `{"error":{"code":..,"message":..}}`, else the
/// body's text, shortened.
pub fn server_message(body: &[u8]) -> String {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = &json["error"];
        if let Some(message) = error["message"].as_str() {
            return match error["code"].as_str() {
                Some(code) => format!("{message} ({code})"),
                None => message.to_string(),
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        _ if text.is_empty() => "(empty body)".to_string(),
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Splits `keys` into contiguous chunks handed out to workers; returns `(start, end)`.
pub fn next_chunk(cursor: &AtomicU64, keys: u64, chunk: u64) -> Option<(u64, u64)> {
    let start = cursor.fetch_add(chunk, Ordering::Relaxed);
    (start < keys).then(|| (start, (start + chunk).min(keys)))
}

/// State shared by the workers of one prefill.
struct Shared {
    opts: PrefillOptions,
    client: reqwest::Client,
    cursor: AtomicU64,
    /// Keys written so far.
    done: AtomicU64,
    /// Set once a write failed in a way that dooms the others too.
    stop: AtomicBool,
    /// Why the prefill stopped.
    fatal: Mutex<Option<PrefillError>>,
}

impl Shared {
    fn abort(&self, error: PrefillError) {
        self.fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Why one key was not written.
enum KeyError {
    /// Still failing after every attempt; the message of the last one.
    GaveUp(String),
    /// The prefill was stopped; the reason is in [`Shared::fatal`].
    Stopped,
}

/// Writes keys `0..opts.keys` with `opts.concurrency` requests in flight, logging progress.
///
/// Transient failures (5xx, 408, 429, timeouts, and connection errors once the host has
/// taken a write) are retried. A 4xx, or a connection error before any key was written,
/// stops the whole prefill at once.
pub async fn prefill(opts: &PrefillOptions) -> Result<PrefillReport, PrefillError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()?;
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        client,
        cursor: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        fatal: Mutex::new(None),
    });
    let started = Instant::now();
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = shared.done.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64();
                tracing::info!("prefill: {n}/{} keys, {rate:.0} keys/s", shared.opts.keys);
            }
        })
    };
    let mut workers = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency.max(1) {
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            let mut failed = 0u64;
            let mut first = None;
            'chunks: while let Some((start, end)) = next_chunk(&shared.cursor, shared.opts.keys, 64)
            {
                for i in start..end {
                    if shared.stopped() {
                        break 'chunks;
                    }
                    match put_with_retry(&shared, i).await {
                        Ok(()) => {
                            shared.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(KeyError::GaveUp(e)) => {
                            failed += 1;
                            first.get_or_insert(e);
                        }
                        Err(KeyError::Stopped) => break 'chunks,
                    }
                }
            }
            (failed, first)
        }));
    }
    let mut failed = 0;
    let mut first = None;
    for w in workers {
        let (f, e) = w
            .await
            .unwrap_or_else(|e| (1, Some(format!("worker panicked: {e}"))));
        failed += f;
        if first.is_none() {
            first = e;
        }
    }
    progress.abort();
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(error) = fatal {
        return Err(error);
    }
    if failed > 0 {
        return Err(PrefillError::Failed {
            failed,
            total: opts.keys,
            first: first.unwrap_or_default(),
        });
    }
    Ok(PrefillReport {
        keys: opts.keys,
        elapsed: started.elapsed(),
    })
}

async fn put_with_retry(shared: &Shared, index: u64) -> Result<(), KeyError> {
    let opts = &shared.opts;
    let key = key_name(index);
    let url = format!("{}{}", opts.host.trim_end_matches('/'), v1_path(&key));
    let value = make_value(&key, opts.value_size);
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt)).await;
            if shared.stopped() {
                return Err(KeyError::Stopped);
            }
        }
        match shared.client.put(&url).body(value.clone()).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => {
                let status = r.status();
                let message = server_message(&r.bytes().await.unwrap_or_default());
                if is_permanent(status) {
                    shared.abort(PrefillError::Rejected {
                        url,
                        status,
                        message,
                    });
                    return Err(KeyError::Stopped);
                }
                last = format!("PUT {url}: HTTP {status}: {message}");
            }
            // Nothing written yet and no connection: a wrong or dead host, not a hiccup.
            Err(e) if e.is_connect() && shared.done.load(Ordering::Relaxed) == 0 => {
                shared.abort(PrefillError::Unreachable {
                    host: opts.host.clone(),
                    error: error_chain(&e),
                });
                return Err(KeyError::Stopped);
            }
            Err(e) => last = format!("PUT {url}: {}", error_chain(&e)),
        }
    }
    Err(KeyError::GaveUp(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_key_exactly_once() {
        let cursor = AtomicU64::new(0);
        let mut covered = Vec::new();
        while let Some((s, e)) = next_chunk(&cursor, 10, 4) {
            covered.extend(s..e);
        }
        assert_eq!(covered, (0..10).collect::<Vec<_>>());
        assert_eq!(next_chunk(&cursor, 10, 4), None);
    }

    #[test]
    fn client_errors_are_permanent_except_the_ones_asking_to_retry() {
        for permanent in [400, 404, 405, 413, 414, 422] {
            assert!(
                is_permanent(StatusCode::from_u16(permanent).unwrap()),
                "{permanent}"
            );
        }
        for transient in [408, 429, 500, 502, 503, 504] {
            assert!(
                !is_permanent(StatusCode::from_u16(transient).unwrap()),
                "{transient}"
            );
        }
    }

    #[test]
    fn server_messages_are_read_from_distkv_errors_or_the_body() {
        assert_eq!(
            server_message(br#"{"error":{"code":"too_large","message":"value over 1 MiB"}}"#),
            "value over 1 MiB (too_large)"
        );
        assert_eq!(server_message(b"  nope\n"), "nope");
        assert_eq!(server_message(b""), "(empty body)");
        let long = "x".repeat(500);
        assert_eq!(server_message(long.as_bytes()).len(), 203);
    }
}
