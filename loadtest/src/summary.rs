//! A small, stable digest of a run, written as `summary.json` next to Goose's reports.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Response-time histogram: milliseconds (as Goose rounds them) to number of requests.
pub type Histogram = BTreeMap<usize, usize>;

/// Counters and latencies of one request kind, e.g. `GET /v1/kv/{key}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRow {
    /// Method and name, as Goose keys its request metrics.
    pub name: String,
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed (transport error, unexpected status or wrong body).
    pub failures: u64,
    /// Median response time in ms.
    pub p50_ms: Option<u64>,
    /// 99th percentile response time in ms.
    pub p99_ms: Option<u64>,
}

/// The digest of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Target URL.
    pub host: String,
    /// Seconds the measured part of the run lasted.
    pub duration_secs: u64,
    /// Requests sent, over all kinds.
    pub requests: u64,
    /// Requests that failed, over all kinds.
    pub failures: u64,
    /// `failures / requests`, 0 when nothing was sent.
    pub error_rate: f64,
    /// Requests per second over the run.
    pub requests_per_sec: f64,
    /// Median response time in ms, over all kinds.
    pub p50_ms: Option<u64>,
    /// 99th percentile response time in ms, over all kinds.
    pub p99_ms: Option<u64>,
    /// Slowest response in ms.
    pub max_ms: Option<u64>,
    /// Per request kind.
    pub per_request: Vec<RequestRow>,
    /// Whether every threshold held; filled in after evaluation.
    pub passed: bool,
    /// Human-readable description of each missed threshold.
    pub misses: Vec<String>,
}

/// Raw numbers of one request kind, as read out of Goose's metrics.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    /// Method and name.
    pub name: String,
    /// Successful requests.
    pub successes: u64,
    /// Failed requests.
    pub failures: u64,
    /// Response-time histogram over all of them.
    pub times: Histogram,
}

/// Smallest time such that at least `q` (0..=1) of the requests were at or below it.
pub fn percentile(times: &Histogram, q: f64) -> Option<u64> {
    let total: usize = times.values().sum();
    if total == 0 {
        return None;
    }
    // Nearest-rank: the ceil(q * n)-th smallest sample, at least the first.
    let rank = ((q * total as f64).ceil() as usize).clamp(1, total);
    let mut seen = 0;
    for (&ms, &count) in times {
        seen += count;
        if seen >= rank {
            return Some(ms as u64);
        }
    }
    times.keys().next_back().map(|&ms| ms as u64)
}

/// Adds every bucket of `from` into `into`.
pub fn merge_into(into: &mut Histogram, from: &Histogram) {
    for (&ms, &count) in from {
        *into.entry(ms).or_default() += count;
    }
}

/// Builds the digest from per-kind numbers; `passed`/`misses` are left for the thresholds.
pub fn summarize(scenario: &str, host: &str, duration_secs: u64, raw: &[RawRequest]) -> Summary {
    let mut all = Histogram::new();
    let mut per_request: Vec<RequestRow> = raw
        .iter()
        .map(|r| {
            merge_into(&mut all, &r.times);
            RequestRow {
                name: r.name.clone(),
                requests: r.successes + r.failures,
                failures: r.failures,
                p50_ms: percentile(&r.times, 0.50),
                p99_ms: percentile(&r.times, 0.99),
            }
        })
        .collect();
    per_request.sort_by(|a, b| a.name.cmp(&b.name));
    let requests: u64 = per_request.iter().map(|r| r.requests).sum();
    let failures: u64 = per_request.iter().map(|r| r.failures).sum();
    Summary {
        scenario: scenario.to_string(),
        host: host.to_string(),
        duration_secs,
        requests,
        failures,
        error_rate: if requests == 0 {
            0.0
        } else {
            failures as f64 / requests as f64
        },
        requests_per_sec: requests as f64 / duration_secs.max(1) as f64,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.keys().next_back().map(|&ms| ms as u64),
        per_request,
        passed: false,
        misses: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(usize, usize)]) -> Histogram {
        pairs.iter().copied().collect()
    }

    #[test]
    fn percentile_uses_nearest_rank() {
        // 98 fast requests, 2 slow: p99 is the 99th smallest, i.e. a slow one.
        let h = hist(&[(1, 98), (250, 2)]);
        assert_eq!(percentile(&h, 0.50), Some(1));
        assert_eq!(percentile(&h, 0.98), Some(1));
        assert_eq!(percentile(&h, 0.99), Some(250));
        assert_eq!(percentile(&h, 1.0), Some(250));
        assert_eq!(percentile(&h, 0.0), Some(1));
        assert_eq!(percentile(&Histogram::new(), 0.5), None);
    }

    #[test]
    fn percentile_of_a_single_outlier_in_a_hundred_is_not_p99() {
        let h = hist(&[(2, 99), (900, 1)]);
        assert_eq!(percentile(&h, 0.99), Some(2));
    }

    #[test]
    fn summary_adds_up_kinds_and_merges_latencies() {
        let raw = vec![
            RawRequest {
                name: "PUT /v1/kv/{key}".into(),
                successes: 9,
                failures: 1,
                times: hist(&[(10, 10)]),
            },
            RawRequest {
                name: "GET /v1/kv/{key}".into(),
                successes: 90,
                failures: 0,
                times: hist(&[(1, 90)]),
            },
        ];
        let s = summarize("read-heavy", "http://h", 10, &raw);
        assert_eq!(s.requests, 100);
        assert_eq!(s.failures, 1);
        assert!((s.error_rate - 0.01).abs() < 1e-12);
        assert!((s.requests_per_sec - 10.0).abs() < 1e-12);
        assert_eq!(s.p50_ms, Some(1));
        assert_eq!(s.p99_ms, Some(10));
        assert_eq!(s.max_ms, Some(10));
        assert_eq!(
            s.per_request[0].name, "GET /v1/kv/{key}",
            "rows are sorted by name"
        );
        assert_eq!(s.per_request[1].p99_ms, Some(10));
    }

    #[test]
    fn empty_run_has_zero_rate_and_no_latency() {
        let s = summarize("demo", "http://h", 0, &[]);
        assert_eq!((s.requests, s.error_rate, s.p99_ms), (0, 0.0, None));
    }
}
