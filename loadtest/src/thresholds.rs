//! Pass/fail criteria evaluated on a finished run.

use crate::summary::Summary;
use std::fmt;

/// Limits given on the command line; `None` means not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Thresholds {
    /// Highest acceptable p99 response time over all requests, in ms.
    pub max_p99_ms: Option<f64>,
    /// Highest acceptable `failed / total`, between 0 and 1.
    pub max_error_rate: Option<f64>,
}

/// One threshold that the run missed.
#[derive(Debug, Clone, PartialEq)]
pub enum Miss {
    /// Nothing was measured, so no threshold can be said to hold.
    NoRequests,
    /// Every request failed (e.g. wrong host): nothing about the store was measured.
    NoSuccesses,
    /// p99 above the limit.
    P99 {
        /// Measured p99 in ms.
        actual_ms: u64,
        /// The limit in ms.
        limit_ms: f64,
    },
    /// Error rate above the limit.
    ErrorRate {
        /// Failed requests.
        failures: u64,
        /// All requests.
        requests: u64,
        /// The limit, between 0 and 1.
        limit: f64,
    },
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Miss::NoRequests => write!(f, "no requests were made"),
            Miss::NoSuccesses => write!(f, "every request failed"),
            Miss::P99 {
                actual_ms,
                limit_ms,
            } => write!(f, "p99 {actual_ms} ms > max {limit_ms} ms"),
            Miss::ErrorRate {
                failures,
                requests,
                limit,
            } => write!(
                f,
                "error rate {:.4}% ({failures}/{requests}) > max {:.4}%",
                *failures as f64 * 100.0 / *requests as f64,
                limit * 100.0
            ),
        }
    }
}

/// Every threshold that `summary` misses; empty means PASS.
pub fn evaluate(summary: &Summary, thresholds: &Thresholds) -> Vec<Miss> {
    // A run that sent nothing (wrong host, router down before the first request) must
    // not pass just because it also had no errors and no slow requests.
    if summary.requests == 0 {
        return vec![Miss::NoRequests];
    }
    if summary.failures == summary.requests {
        return vec![Miss::NoSuccesses];
    }
    let mut misses = Vec::new();
    if let (Some(limit_ms), Some(actual_ms)) = (thresholds.max_p99_ms, summary.p99_ms) {
        if actual_ms as f64 > limit_ms {
            misses.push(Miss::P99 {
                actual_ms,
                limit_ms,
            });
        }
    }
    if let Some(limit) = thresholds.max_error_rate {
        if summary.error_rate > limit {
            misses.push(Miss::ErrorRate {
                failures: summary.failures,
                requests: summary.requests,
                limit,
            });
        }
    }
    misses
}

/// The one line printed at the end of a run.
pub fn verdict_line(summary: &Summary, thresholds: &Thresholds, misses: &[Miss]) -> String {
    let p99 = summary
        .p99_ms
        .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms"));
    let limits = format!(
        "max p99 {}, max error rate {}",
        thresholds
            .max_p99_ms
            .map_or_else(|| "unchecked".to_string(), |v| format!("{v} ms")),
        thresholds
            .max_error_rate
            .map_or_else(|| "unchecked".to_string(), |v| format!("{:.4}%", v * 100.0)),
    );
    let measured = format!(
        "{} requests, {} failed, p99 {p99}",
        summary.requests, summary.failures
    );
    if misses.is_empty() {
        format!("PASS: {measured} ({limits})")
    } else {
        let why: Vec<String> = misses.iter().map(Miss::to_string).collect();
        format!("FAIL: {}; {measured} ({limits})", why.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{RawRequest, summarize};

    fn run(successes: u64, failures: u64, times: &[(usize, usize)]) -> Summary {
        summarize(
            "demo",
            "http://h",
            1,
            &[RawRequest {
                name: "GET /get".into(),
                successes,
                failures,
                times: times.iter().copied().collect(),
            }],
        )
    }

    #[test]
    fn within_limits_passes() {
        let s = run(1000, 1, &[(5, 1001)]);
        let t = Thresholds {
            max_p99_ms: Some(5.0),
            max_error_rate: Some(0.001),
        };
        assert_eq!(evaluate(&s, &t), vec![]);
        assert!(verdict_line(&s, &t, &[]).starts_with("PASS: 1001 requests, 1 failed"));
    }

    #[test]
    fn slow_p99_fails() {
        let s = run(100, 0, &[(1, 95), (80, 5)]);
        let t = Thresholds {
            max_p99_ms: Some(50.0),
            max_error_rate: None,
        };
        let misses = evaluate(&s, &t);
        assert_eq!(
            misses,
            vec![Miss::P99 {
                actual_ms: 80,
                limit_ms: 50.0
            }]
        );
        assert!(verdict_line(&s, &t, &misses).starts_with("FAIL: p99 80 ms > max 50 ms"));
    }

    #[test]
    fn any_failure_fails_a_zero_error_budget() {
        let s = run(999, 1, &[(1, 1000)]);
        let t = Thresholds {
            max_p99_ms: None,
            max_error_rate: Some(0.0),
        };
        assert!(matches!(
            evaluate(&s, &t).as_slice(),
            [Miss::ErrorRate {
                failures: 1,
                requests: 1000,
                ..
            }]
        ));
    }

    #[test]
    fn both_misses_are_reported() {
        let s = run(1, 1, &[(100, 2)]);
        let t = Thresholds {
            max_p99_ms: Some(10.0),
            max_error_rate: Some(0.1),
        };
        assert_eq!(evaluate(&s, &t).len(), 2);
    }

    #[test]
    fn no_requests_never_passes_even_without_limits() {
        let s = run(0, 0, &[]);
        assert_eq!(evaluate(&s, &Thresholds::default()), vec![Miss::NoRequests]);
    }

    #[test]
    fn all_failed_never_passes_even_without_limits() {
        let s = run(0, 5, &[(0, 5)]);
        assert_eq!(
            evaluate(&s, &Thresholds::default()),
            vec![Miss::NoSuccesses]
        );
    }

    #[test]
    fn unchecked_limits_do_not_fail_a_bad_run() {
        let s = run(1, 9, &[(10_000, 10)]);
        assert_eq!(evaluate(&s, &Thresholds::default()), vec![]);
    }
}
