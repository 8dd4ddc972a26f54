//! Writes every key of a keyspace once, so that reads hit and memory can be measured.

use crate::keys::{key_name, make_value};
use crate::scenario::v1_path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A prefill that did not write every key.
#[derive(Debug, Error)]
pub enum PrefillError {
    /// The HTTP client could not be built.
    #[error("building HTTP client: {0}")]
    Client(#[from] reqwest::Error),
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

/// Splits `keys` into contiguous chunks handed out to workers; returns `(start, end)`.
pub fn next_chunk(cursor: &AtomicU64, keys: u64, chunk: u64) -> Option<(u64, u64)> {
    let start = cursor.fetch_add(chunk, Ordering::Relaxed);
    (start < keys).then(|| (start, (start + chunk).min(keys)))
}

/// Writes keys `0..opts.keys` with `opts.concurrency` requests in flight, logging progress.
pub async fn prefill(opts: &PrefillOptions) -> Result<PrefillReport, PrefillError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let cursor = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let done = done.clone();
        let total = opts.keys;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64();
                tracing::info!("prefill: {n}/{total} keys, {rate:.0} keys/s");
            }
        })
    };
    let mut workers = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency.max(1) {
        let (client, cursor, done, opts) =
            (client.clone(), cursor.clone(), done.clone(), opts.clone());
        workers.push(tokio::spawn(async move {
            let mut failed = 0u64;
            let mut first = None;
            while let Some((start, end)) = next_chunk(&cursor, opts.keys, 64) {
                for i in start..end {
                    match put_with_retry(&client, &opts, i).await {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed += 1;
                            first.get_or_insert(e);
                        }
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

async fn put_with_retry(
    client: &reqwest::Client,
    opts: &PrefillOptions,
    index: u64,
) -> Result<(), String> {
    let key = key_name(index);
    let url = format!("{}{}", opts.host.trim_end_matches('/'), v1_path(&key));
    let value = make_value(&key, opts.value_size);
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        match client.put(&url).body(value.clone()).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("PUT {url}: HTTP {}", r.status()),
            Err(e) => last = format!("PUT {url}: {e}"),
        }
    }
    Err(last)
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
}
