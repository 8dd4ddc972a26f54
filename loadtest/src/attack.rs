//! Wiring of a [`Plan`] into a Goose attack, and of Goose's metrics back into a [`Summary`].

use crate::keys::{choose_key, key_name, make_value, value_belongs_to};
use crate::scenario::{self, Api, DemoGet, Plan};
use crate::summary::{RawRequest, Summary, summarize};
use goose::config::GooseConfiguration;
use goose::goose::{GooseMethod, GooseRequest, GooseUser, Transaction, TransactionResult};
use goose::metrics::GooseMetrics;
use goose::{GooseAttack, GooseError};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use thiserror::Error;

/// Why a run could not be carried out (as opposed to a run that missed its thresholds).
#[derive(Debug, Error)]
pub enum AttackError {
    /// Goose refused the configuration or failed while running.
    #[error("goose: {0}")]
    Goose(#[from] Box<GooseError>),
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
    // The controllers listen on fixed ports on all interfaces; two runs on one machine
    // would collide, and nothing here drives Goose remotely.
    c.no_telnet = true;
    c.no_websocket = true;
    c
}

type TxFuture<'r> = Pin<Box<dyn Future<Output = TransactionResult> + Send + 'r>>;

fn transaction<F>(
    plan: &Arc<Plan>,
    name: &str,
    weight: usize,
    f: F,
) -> Result<Transaction, GooseError>
where
    F: for<'r> Fn(&'r mut GooseUser, Arc<Plan>) -> TxFuture<'r> + Send + Sync + 'static,
{
    let plan = plan.clone();
    Transaction::new(Arc::new(move |user| f(user, plan.clone())))
        .set_name(name)
        .set_weight(weight)
}

/// The Goose scenario for `plan`: one GET and one PUT transaction, weighted by its mix.
pub fn goose_scenario(plan: Arc<Plan>) -> Result<goose::goose::Scenario, GooseError> {
    let mix = plan.scenario.mix();
    let (get, put) = match plan.scenario.api() {
        Api::V1 => (
            transaction(&plan, "get", mix.get, |u, p| Box::pin(v1_get(u, p)))?,
            transaction(&plan, "put", mix.put, |u, p| Box::pin(v1_put(u, p)))?,
        ),
        Api::Demo => (
            transaction(&plan, "get", mix.get, |u, p| Box::pin(demo_get(u, p)))?,
            transaction(&plan, "put", mix.put, |u, p| Box::pin(demo_put(u, p)))?,
        ),
    };
    Ok(goose::goose::Scenario::new(plan.scenario.name())
        .register_transaction(get)
        .register_transaction(put))
}

fn random_key(plan: &Plan) -> String {
    key_name(choose_key(&mut rand::rng(), plan.keyspace))
}

async fn v1_get(user: &mut GooseUser, plan: Arc<Plan>) -> TransactionResult {
    let key = random_key(&plan);
    let path = scenario::v1_path(&key);
    let request = GooseRequest::builder()
        .method(GooseMethod::Get)
        .path(path.as_str())
        .name("/v1/kv/{key}")
        .build();
    let mut goose = user.request(request).await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    match response.status().as_u16() {
        // A key not written yet is a correct answer, not an error of the store.
        404 => user.set_success(&mut goose.request),
        200 => {
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
        // Goose already counted any other status as a failure.
        _ => Ok(()),
    }
}

async fn v1_put(user: &mut GooseUser, plan: Arc<Plan>) -> TransactionResult {
    let key = random_key(&plan);
    let path = scenario::v1_path(&key);
    let body = make_value(&key, plan.value_size);
    let builder = user
        .get_request_builder(&GooseMethod::Put, &path)?
        .body(body);
    let request = GooseRequest::builder()
        .method(GooseMethod::Put)
        .path(path.as_str())
        .name("/v1/kv/{key}")
        .set_request_builder(builder)
        .build();
    user.request(request).await?;
    Ok(())
}

async fn demo_get(user: &mut GooseUser, plan: Arc<Plan>) -> TransactionResult {
    let key = random_key(&plan);
    let path = scenario::demo_get_path(&key);
    let request = GooseRequest::builder()
        .method(GooseMethod::Get)
        .path(path.as_str())
        .name("/get?key={key}")
        .build();
    let mut goose = user.request(request).await?;
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

async fn demo_put(user: &mut GooseUser, plan: Arc<Plan>) -> TransactionResult {
    let key = random_key(&plan);
    let value = make_value(&key, plan.value_size);
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
    user.request(request).await?;
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
    let plan = Arc::new(plan);
    let metrics = GooseAttack::initialize_with_config(configuration(opts))?
        .register_scenario(goose_scenario(plan.clone())?)
        .execute()
        .await?;
    Ok(summarize(
        plan.scenario.name(),
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
    }

    #[test]
    fn scenarios_register_both_transactions() {
        for s in Scenario::ALL {
            let g = goose_scenario(Arc::new(Plan::new(s, None, None))).unwrap();
            assert_eq!(g.name, s.name());
            assert_eq!(g.transactions.len(), 2);
            assert_eq!(g.transactions[0].weight, s.mix().get);
            assert_eq!(g.transactions[1].weight, s.mix().put);
        }
    }
}
