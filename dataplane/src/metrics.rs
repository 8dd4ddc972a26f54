//! Prometheus metrics of a node or router, and the middleware that counts requests.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::budget::BodyBudget;
use crate::storage::CommitObserver;

/// Every metric a process exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route template and status code.
    pub requests: IntCounterVec,
    /// Request latency by route template.
    pub latency: HistogramVec,
    /// Keys stored (nodes).
    pub keys: IntGauge,
    /// Last applied log seq (nodes).
    pub applied_seq: IntGauge,
    /// Highest committed seq (nodes).
    pub commit_seq: IntGauge,
    /// Highest epoch seen (nodes).
    pub epoch: IntGauge,
    /// Requests per group-commit transaction (nodes).
    pub batch_size: Histogram,
    /// Seconds per group-commit transaction, fsync included (nodes).
    pub commit_seconds: Histogram,
    /// Snapshots installed (nodes).
    pub snapshots_installed: IntCounter,
    /// Times this replica took leadership at a new epoch (elections and failovers).
    pub promotions: IntCounter,
    /// Changes to the in-sync set this replica enforced as leader.
    pub in_sync_changes: IntCounter,
    /// Topology version in use (routers).
    pub topology_version: IntGauge,
    /// Requests retried after a leader change (routers).
    pub retries: IntCounter,
}

/// Which kind of process exports the metrics: each registers only what it updates, so a
/// dashboard never reads a router's never-updated replica gauges as an empty store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    /// A replica (`distkv node`).
    Node,
    /// A router (`distkv router`).
    Router,
}

impl Metrics {
    /// Creates the metrics and registers those `exporter` updates.
    pub fn new(exporter: Exporter) -> Arc<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "distkv_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .unwrap();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "distkv_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["route"],
        )
        .unwrap();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).unwrap();
        let m = Metrics {
            keys: gauge("distkv_keys", "Keys stored on this replica"),
            applied_seq: gauge("distkv_applied_seq", "Last log sequence applied"),
            commit_seq: gauge("distkv_commit_seq", "Highest committed log sequence"),
            epoch: gauge("distkv_epoch", "Highest epoch seen"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "distkv_group_commit_requests",
                    "Requests per group-commit transaction",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                ]),
            )
            .unwrap(),
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "distkv_group_commit_seconds",
                    "Seconds per group-commit transaction including fsync",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ]),
            )
            .unwrap(),
            snapshots_installed: IntCounter::new(
                "distkv_snapshots_installed_total",
                "Snapshots installed from a leader",
            )
            .unwrap(),
            promotions: IntCounter::new(
                "distkv_leader_promotions_total",
                "Times this replica became leader at a new epoch",
            )
            .unwrap(),
            in_sync_changes: IntCounter::new(
                "distkv_in_sync_changes_total",
                "Changes to the in-sync set enforced by this replica as leader",
            )
            .unwrap(),
            topology_version: gauge("distkv_topology_version", "Topology version in use"),
            retries: IntCounter::new(
                "distkv_router_retries_total",
                "Requests retried after a topology change",
            )
            .unwrap(),
            requests,
            latency,
            registry,
        };
        m.register(Box::new(m.requests.clone()));
        m.register(Box::new(m.latency.clone()));
        match exporter {
            Exporter::Node => {
                m.register(Box::new(m.keys.clone()));
                m.register(Box::new(m.applied_seq.clone()));
                m.register(Box::new(m.commit_seq.clone()));
                m.register(Box::new(m.epoch.clone()));
                m.register(Box::new(m.batch_size.clone()));
                m.register(Box::new(m.commit_seconds.clone()));
                m.register(Box::new(m.snapshots_installed.clone()));
                m.register(Box::new(m.promotions.clone()));
                m.register(Box::new(m.in_sync_changes.clone()));
            }
            Exporter::Router => {
                m.register(Box::new(m.topology_version.clone()));
                m.register(Box::new(m.retries.clone()));
            }
        }
        Arc::new(m)
    }

    /// Exports `distkv_request_body_bytes_held`, read from `budget` at each scrape.
    pub fn watch_bodies(&self, budget: BodyBudget) {
        let gauge = IntGauge::new(
            "distkv_request_body_bytes_held",
            "Bytes of request bodies held in memory now (counted against the body budget)",
        )
        .unwrap();
        self.register(Box::new(BodiesHeld { budget, gauge }));
    }

    /// Registers an extra collector (e.g. the playground's failover counters).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        self.registry.register(c).unwrap();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}

/// The bytes a [`BodyBudget`] holds, as a gauge read when scraped.
struct BodiesHeld {
    budget: BodyBudget,
    gauge: IntGauge,
}

impl Collector for BodiesHeld {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set(self.budget.held() as i64);
        self.gauge.collect()
    }
}

impl CommitObserver for Metrics {
    fn committed(&self, requests: usize, seconds: f64) {
        self.batch_size.observe(requests as f64);
        self.commit_seconds.observe(seconds);
    }
}

/// Middleware: counts every request by route template and status, and times it.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    // A shared string, not a copy: this runs on every request.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

/// Finishes a public app: `/metrics`, JSON 404/405 answers, and request metrics on every route.
pub fn instrument(app: axum::Router, metrics: &Arc<Metrics>) -> axum::Router {
    app.route(
        "/metrics",
        axum::routing::get(serve).with_state(metrics.clone()),
    )
    .fallback(crate::api::unknown_route)
    .method_not_allowed_fallback(crate::api::wrong_method)
    .layer(axum::middleware::from_fn_with_state(metrics.clone(), track))
}

/// `GET /metrics`.
pub async fn serve(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_exports_only_its_own_metrics() {
        let node = Metrics::new(Exporter::Node).render();
        let router = Metrics::new(Exporter::Router).render();
        for name in [
            "distkv_keys ",
            "distkv_epoch ",
            "distkv_group_commit_seconds",
        ] {
            assert!(node.contains(name), "node lacks {name}");
            assert!(!router.contains(name), "router exports {name}");
        }
        assert!(router.contains("distkv_router_retries_total "));
        assert!(!node.contains("distkv_router_retries_total"));
    }
}
