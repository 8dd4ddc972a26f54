//! Wiring of a [`Plan`] into a Goose attack, and of Goose's metrics back into a [`Summary`].

use crate::keys::{choose_key, key_name, make_value, value_belongs_to};
use crate::scenario::{self, Api, DemoGet, Plan};
use crate::summary::{RawRequest, Summary, summarize};
use goose::config::GooseConfiguration;
use goose::goose::{
    GooseMethod, GooseRequest, GooseResponse, GooseUser, Transaction, TransactionError,
    TransactionResult,
};
use goose::logger::GooseLog;
use goose::metrics::{
    GooseCoordinatedOmissionMitigation, GooseMetric, GooseMetrics, GooseRequestMetric,
};
use goose::{GooseAttack, GooseError};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use thiserror::Error;

/// Why a run could not be carried out (as opposed to a run that missed its thresholds).
#[derive(Debug, Error)]
pub enum AttackError {
    /// Goose refused the configuration or failed while running.
    #[error("goose: {}", describe_goose_error(.0))]
    Goose(Box<GooseError>),
    /// Every request failed to connect: nothing about the store was measured.
    #[error(
        "no request reached {host}: all {refused} requests failed to connect ({error}); is the router running and is --host right?"
    )]
    Unreachable {
        /// The host from `--host`.
        host: String,
        /// Requests that failed to connect.
        refused: u64,
        /// The first connection error, with its causes.
        error: String,
    },
    /// The report directory could not be created.
    #[error("report directory {path}: {source}")]
    ReportDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<GooseError> for AttackError {
    fn from(e: GooseError) -> Self {
        AttackError::Goose(Box::new(e))
    }
}

/// Goose's error with the details its `Display` leaves out (which option, which value).
pub fn describe_goose_error(e: &GooseError) -> String {
    match e {
        GooseError::InvalidOption {
            option,
            value,
            detail,
        } => format!("invalid value {value:?} for {option}: {detail}"),
        GooseError::InvalidHost {
            host,
            detail,
            parse_error,
        } => format!("invalid host {host:?}: {detail} ({parse_error})"),
        other => {
            let text = other.to_string();
            text.strip_prefix("GooseError: ")
                .map_or(text.clone(), str::to_string)
        }
    }
}

/// An error and its causes, e.g. `error sending request ...: tcp connect error: Connection
/// refused (os error 111)`; reqwest's own `Display` stops at the first line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether the requests of a run reached the host at all.
#[derive(Debug, Default)]
pub struct Reachability {
    /// Requests that got an answer, or failed after connecting (e.g. a timeout).
    reached: AtomicU64,
    /// Requests that failed to connect.
    refused: AtomicU64,
    /// The first connection error.
    first_refusal: OnceLock<String>,
}

impl Reachability {
    /// Counts a request that reached the host.
    pub fn reached(&self) {
        self.reached.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request that failed to connect, with its error.
    pub fn refused(&self, error: impl FnOnce() -> String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.first_refusal.get_or_init(error);
    }

    /// When requests were made and none of them connected: how many, and the first error.
    pub fn unreachable(&self) -> Option<(u64, String)> {
        let refused = self.refused.load(Ordering::Relaxed);
        (refused > 0 && self.reached.load(Ordering::Relaxed) == 0).then(|| {
            (
                refused,
                self.first_refusal.get().cloned().unwrap_or_default(),
            )
        })
    }
}

/// What every user of one run shares.
#[derive(Debug)]
pub struct Shared {
    /// What to send.
    pub plan: Plan,
    /// What the requests found out about the host.
    pub reach: Reachability,
}

impl Shared {
    /// Shared state for a run of `plan`, before any request.
    pub fn new(plan: Plan) -> Self {
        Shared {
            plan,
            reach: Reachability::default(),
        }
    }
}

/// How long a user waits after a request that could not connect, so an unreachable host is
/// not hammered with thousands of doomed requests per second.
pub const CONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// How to run, independent of what to send.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Base URL of the router, e.g. `http://127.0.0.1:8080`.
    pub host: String,
    /// Concurrent simulated users.
    pub users: usize,
    /// Users started per second.
    pub hatch_rate: f64,
    /// Length of the run in seconds once all users are started.
    pub duration_secs: u64,
    /// Where `report.html` and `report.json` go; no Goose reports when `None`.
    pub report_dir: Option<PathBuf>,
    /// Seconds between progress tables; 0 disables them.
    pub progress_secs: usize,
    /// Per-request timeout in seconds.
    pub timeout_secs: u64,
}

/// Paths of Goose's reports inside `dir`.
pub fn report_paths(dir: &std::path::Path) -> [PathBuf; 2] {
    [dir.join("report.html"), dir.join("report.json")]
}

/// Goose settings for `opts`.
pub fn configuration(opts: &RunOptions) -> GooseConfiguration {
    let mut c = GooseConfiguration::default();
    c.host = opts.host.clone();
    c.users = Some(opts.users);
    c.hatch_rate = Some(opts.hatch_rate.to_string());
    c.run_time = format!("{}s", opts.duration_secs);
    c.running_metrics = (opts.progress_secs > 0).then_some(opts.progress_secs);
    c.timeout = Some(opts.timeout_secs.to_string());
    if let Some(dir) = &opts.report_dir {
        c.report_file = report_paths(dir)
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
    }
    // Thresholds and reports should cover the ramp-up too: an error while users start is
    // still an error.
    c.no_reset_metrics = true;
    // `send` reports request metrics itself and assumes Goose sends no extra, synthetic
    // ones; this is Goose's default, spelt out.
    c.co_mitigation = Some(GooseCoordinatedOmissionMitigation::Disabled);
    // The controllers listen on fixed ports on all interfaces; two runs on one machine
    // would collide, and nothing here drives Goose remotely.
    c.no_telnet = true;
    c.no_websocket = true;
    c
}

type TxFuture<'r> = Pin<Box<dyn Future<Output = TransactionResult> + Send + 'r>>;

fn transaction<F>(
    shared: &Arc<Shared>,
    name: &str,
    weight: usize,
    f: F,
) -> Result<Transaction, GooseError>
where
    F: for<'r> Fn(&'r mut GooseUser, Arc<Shared>) -> TxFuture<'r> + Send + Sync + 'static,
{
    let shared = shared.clone();
    Transaction::new(Arc::new(move |user| f(user, shared.clone())))
        .set_name(name)
        .set_weight(weight)
}

/// The Goose scenario for `shared.plan`: one GET and one PUT transaction, weighted by its
/// mix.
pub fn goose_scenario(shared: Arc<Shared>) -> Result<goose::goose::Scenario, GooseError> {
    let plan = &shared.plan;
    let mix = plan.scenario.mix();
    let (get, put) = match plan.scenario.api() {
        Api::V1 => (
            transaction(&shared, "get", mix.get, |u, s| Box::pin(v1_get(u, s)))?,
            transaction(&shared, "put", mix.put, |u, s| Box::pin(v1_put(u, s)))?,
        ),
        Api::Demo => (
            transaction(&shared, "get", mix.get, |u, s| Box::pin(demo_get(u, s)))?,
            transaction(&shared, "put", mix.put, |u, s| Box::pin(demo_put(u, s)))?,
        ),
    };
    Ok(goose::goose::Scenario::new(plan.scenario.name())
        .register_transaction(get)
        .register_transaction(put))
}

fn random_key(plan: &Plan) -> String {
    key_name(choose_key(&mut rand::rng(), plan.keyspace))
}

/// Marks `metric` a success when its status is `also_ok`; true when it did.
///
/// Only for a metric Goose has not received yet: see [`send`].
pub fn accept_status(metric: &mut GooseRequestMetric, also_ok: Option<u16>) -> bool {
    if metric.success || also_ok != Some(metric.status_code) {
        return false;
    }
    metric.success = true;
    metric.error.clear();
    true
}

/// Hands a request metric to Goose, as `GooseUser::request` does when metrics are on.
fn report_metric(user: &GooseUser, metric: &GooseRequestMetric) -> TransactionResult {
    if !user.config.request_log.is_empty() {
        if let Some(logger) = &user.logger {
            logger
                .send(Some(GooseLog::Request(metric.clone())))
                .map_err(|e| Box::new(TransactionError::from(e)))?;
        }
    }
    if let Some(metrics) = &user.metrics_channel {
        metrics
            .send(GooseMetric::Request(Box::new(metric.clone())))
            .map_err(|e| Box::new(TransactionError::from(e)))?;
    }
    Ok(())
}

/// Makes `request` through Goose, taking the status `also_ok` (besides 2xx) as a correct
/// answer, and notes whether the host was reached.
///
/// Goose judges a request by its status and counts the error as soon as it receives the
/// metric. `GooseUser::set_success` afterwards only sends an update, which flips the
/// counters but, as it still carries the error text, is counted in the ERRORS table once
/// more (goose 0.18). So the metric is held back from Goose while the request is made,
/// corrected, and then reported once.
async fn send(
    user: &mut GooseUser,
    shared: &Shared,
    request: GooseRequest<'_>,
    also_ok: Option<u16>,
) -> Result<GooseResponse, Box<TransactionError>> {
    let metrics_off = user.config.no_metrics;
    user.config.no_metrics = true;
    let made = user.request(request).await;
    user.config.no_metrics = metrics_off;
    let mut goose = made?;
    accept_status(&mut goose.request, also_ok);
    let refused = match &goose.response {
        Err(e) if e.is_connect() => {
            shared.reach.refused(|| error_chain(e));
            true
        }
        _ => {
            shared.reach.reached();
            false
        }
    };
    if !metrics_off {
        report_metric(user, &goose.request)?;
    }
    if refused {
        tokio::time::sleep(CONNECT_BACKOFF).await;
    }
    Ok(goose)
}

async fn v1_get(user: &mut GooseUser, shared: Arc<Shared>) -> TransactionResult {
    let key = random_key(&shared.plan);
    let path = scenario::v1_path(&key);
    let request = GooseRequest::builder()
        .method(GooseMethod::Get)
        .path(path.as_str())
        .name("/v1/kv/{key}")
        .build();
    // A key not written yet is a correct answer, not an error of the store.
    let mut goose = send(user, &shared, request, Some(404)).await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    if response.status() != 200 {
        // A 404 was taken as a success and any other status as a failure by `send`.
        return Ok(());
    }
    let headers = response.headers().clone();
    match response.bytes().await {
        Ok(body) if value_belongs_to(&key, &body) => Ok(()),
        Ok(body) => user.set_failure(
            "GET returned another key's value",
            &mut goose.request,
            Some(&headers),
            Some(&String::from_utf8_lossy(&body[..body.len().min(200)])),
        ),
        Err(e) => user.set_failure(
            &format!("reading GET body: {e}"),
            &mut goose.request,
            Some(&headers),
            None,
        ),
    }
}

async fn v1_put(user: &mut GooseUser, shared: Arc<Shared>) -> TransactionResult {
    let key = random_key(&shared.plan);
    let path = scenario::v1_path(&key);
    let body = make_value(&key, shared.plan.value_size);
    let builder = user
        .get_request_builder(&GooseMethod::Put, &path)?
        .body(body);
    let request = GooseRequest::builder()
        .method(GooseMethod::Put)
        .path(path.as_str())
        .name("/v1/kv/{key}")
        .set_request_builder(builder)
        .build();
    send(user, &shared, request, None).await?;
    Ok(())
}

async fn demo_get(user: &mut GooseUser, shared: Arc<Shared>) -> TransactionResult {
    let key = random_key(&shared.plan);
    let path = scenario::demo_get_path(&key);
    let request = GooseRequest::builder()
        .method(GooseMethod::Get)
        .path(path.as_str())
        .name("/get?key={key}")
        .build();
    // The demo API answers a missing key with 200 and `Key not found`.
    let mut goose = send(user, &shared, request, None).await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    if !response.status().is_success() {
        return Ok(());
    }
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => {
            return user.set_failure(
                &format!("reading /get body: {e}"),
                &mut goose.request,
                Some(&headers),
                None,
            );
        }
    };
    match scenario::parse_demo_get(&key, &body) {
        DemoGet::NotFound => Ok(()),
        DemoGet::Found(value) if value_belongs_to(&key, value.as_bytes()) => Ok(()),
        DemoGet::Found(_) => user.set_failure(
            "/get returned another key's value",
            &mut goose.request,
            Some(&headers),
            Some(&String::from_utf8_lossy(&body[..body.len().min(200)])),
        ),
        DemoGet::Invalid => user.set_failure(
            "/get returned an unexpected body",
            &mut goose.request,
            Some(&headers),
            Some(&String::from_utf8_lossy(&body[..body.len().min(200)])),
        ),
    }
}

async fn demo_put(user: &mut GooseUser, shared: Arc<Shared>) -> TransactionResult {
    let key = random_key(&shared.plan);
    let value = make_value(&key, shared.plan.value_size);
    let body = scenario::demo_put_body(&key, &value);
    let builder = user
        .get_request_builder(&GooseMethod::Post, "/put")?
        .header("content-type", "application/json")
        .body(body.to_string());
    let request = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path("/put")
        .name("/put")
        .set_request_builder(builder)
        .build();
    send(user, &shared, request, None).await?;
    Ok(())
}

/// Reads Goose's per-request metrics into the plain form [`summarize`] takes.
pub fn raw_requests(metrics: &GooseMetrics) -> Vec<RawRequest> {
    metrics
        .requests
        .iter()
        .map(|(name, agg)| RawRequest {
            name: name.clone(),
            successes: agg.success_count as u64,
            failures: agg.fail_count as u64,
            times: agg.raw_data.times.clone(),
        })
        .collect()
}

/// Runs `plan` with `opts` and digests the result; thresholds are left to the caller.
pub async fn run(plan: Plan, opts: &RunOptions) -> Result<Summary, AttackError> {
    if let Some(dir) = &opts.report_dir {
        std::fs::create_dir_all(dir).map_err(|source| AttackError::ReportDir {
            path: dir.clone(),
            source,
        })?;
    }
    let shared = Arc::new(Shared::new(plan));
    let metrics = GooseAttack::initialize_with_config(configuration(opts))?
        .register_scenario(goose_scenario(shared.clone())?)
        .execute()
        .await?;
    // Thresholds judge the store; with no answer from it at all there is nothing to judge.
    if let Some((refused, error)) = shared.reach.unreachable() {
        return Err(AttackError::Unreachable {
            host: opts.host.clone(),
            refused,
            error,
        });
    }
    Ok(summarize(
        shared.plan.scenario.name(),
        &opts.host,
        metrics.duration as u64,
        &raw_requests(&metrics),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn opts() -> RunOptions {
        RunOptions {
            host: "http://127.0.0.1:1".into(),
            users: 3,
            hatch_rate: 1.5,
            duration_secs: 7,
            report_dir: Some(PathBuf::from("/reports")),
            progress_secs: 0,
            timeout_secs: 5,
        }
    }

    #[test]
    fn configuration_carries_the_flags_and_disables_controllers() {
        let c = configuration(&opts());
        assert_eq!(c.users, Some(3));
        assert_eq!(c.hatch_rate.as_deref(), Some("1.5"));
        assert_eq!(c.run_time, "7s");
        assert_eq!(c.running_metrics, None);
        assert_eq!(
            c.report_file,
            vec!["/reports/report.html", "/reports/report.json"]
        );
        assert!(c.no_telnet && c.no_websocket && c.no_reset_metrics);
        assert_eq!(
            c.co_mitigation,
            Some(GooseCoordinatedOmissionMitigation::Disabled)
        );
    }

    fn metric(status: u16, success: bool) -> GooseRequestMetric {
        serde_json::from_value(serde_json::json!({
            "elapsed": 0, "scenario_index": 0, "scenario_name": "read-heavy",
            "transaction_index": "0", "transaction_name": "get",
            "raw": {"method": "Get", "url": "http://h/v1/kv/k", "headers": [], "body": ""},
            "name": "/v1/kv/{key}", "final_url": "http://h/v1/kv/k", "redirected": false,
            "response_time": 1, "status_code": status, "success": success, "update": false,
            "user": 0,
            "error": if success { String::new() } else { format!("{status}: /v1/kv/{{key}}") },
            "coordinated_omission_elapsed": 0, "user_cadence": 0,
        }))
        .unwrap()
    }

    #[test]
    fn an_accepted_status_becomes_a_success_without_an_error() {
        let mut m = metric(404, false);
        assert!(accept_status(&mut m, Some(404)));
        assert!(m.success && !m.update);
        assert_eq!(m.error, "", "Goose would list a non-empty error in ERRORS");

        let mut m = metric(503, false);
        assert!(!accept_status(&mut m, Some(404)));
        assert!(!m.success && !m.error.is_empty());

        let mut m = metric(404, false);
        assert!(!accept_status(&mut m, None));
        assert!(!m.success);

        let mut m = metric(200, true);
        assert!(!accept_status(&mut m, Some(404)));
        assert!(m.success);
    }

    #[test]
    fn unreachable_only_when_nothing_connected() {
        let r = Reachability::default();
        assert_eq!(r.unreachable(), None, "no request, nothing to say");
        r.refused(|| "connection refused".into());
        r.refused(|| "second".into());
        assert_eq!(r.unreachable(), Some((2, "connection refused".into())));
        r.reached();
        assert_eq!(r.unreachable(), None, "one answer means the host is there");
    }

    #[test]
    fn goose_errors_name_the_option() {
        let e = GooseError::InvalidOption {
            option: "`configuration.users`".into(),
            value: "0".into(),
            detail: "must be at least 1".into(),
        };
        let text = AttackError::from(e).to_string();
        assert_eq!(
            text,
            r#"goose: invalid value "0" for `configuration.users`: must be at least 1"#
        );
    }

    #[test]
    fn scenarios_register_both_transactions() {
        for s in Scenario::ALL {
            let g = goose_scenario(Arc::new(Shared::new(Plan::new(s, None, None)))).unwrap();
            assert_eq!(g.name, s.name());
            assert_eq!(g.transactions.len(), 2);
            assert_eq!(g.transactions[0].weight, s.mix().get);
            assert_eq!(g.transactions[1].weight, s.mix().put);
        }
    }
}
