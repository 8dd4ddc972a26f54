//! Prometheus metrics and the operator's `/metrics` + `/healthz` listener.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconcile rounds by outcome (`ok`, `invalid`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile duration in seconds.
    pub reconcile_seconds: HistogramVec,
    /// Control core events by kind (`Promoted`, `Demoted`, `InSyncChanged`, ...).
    pub control_events: IntCounterVec,
    /// Shards with a serving leader, per cluster.
    pub shards_serving: IntGaugeVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "distkv_operator_reconciles_total",
                "Reconcile rounds by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "distkv_operator_reconcile_seconds",
                "Duration of a reconcile round",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["cluster"],
        )
        .expect("valid metric");
        let control_events = IntCounterVec::new(
            Opts::new(
                "distkv_operator_control_events_total",
                "Control core events by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let shards_serving = IntGaugeVec::new(
            Opts::new(
                "distkv_operator_shards_serving",
                "Shards with a serving leader",
            ),
            &["namespace", "cluster"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "distkv_operator_leader",
            "1 while this replica holds the leader Lease",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_seconds.clone()),
            Box::new(control_events.clone()),
            Box::new(shards_serving.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            control_events,
            shards_serving,
            leader,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The HTTP routes: `/metrics` and `/healthz`. Health says only that the process serves:
/// the operator exits by itself when its controller stops or it loses its lease, and a
/// round that hangs shows in `/metrics` (reconcile counts stop), not here.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Metrics>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .with_state(metrics)
}

/// Serves [`router`] on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(metrics)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_and_healthz_are_served() {
        let metrics = Metrics::new();
        metrics.reconciles.with_label_values(&["ok"]).inc();
        metrics
            .control_events
            .with_label_values(&["Promoted"])
            .inc();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(metrics)).await });
        let http = dataplane::client::HttpClient::new();
        let timeout = std::time::Duration::from_secs(2);
        let body = http
            .get(&addr.to_string(), "/metrics", timeout)
            .await
            .unwrap();
        let text = String::from_utf8(body.body.to_vec()).unwrap();
        assert!(
            text.contains("distkv_operator_reconciles_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("distkv_operator_control_events_total{kind=\"Promoted\"} 1"));
        let health = http
            .get(&addr.to_string(), "/healthz", timeout)
            .await
            .unwrap();
        assert_eq!(health.status.as_u16(), 200);
    }
}
