//! `distkv-loadtest`: command line for the distkv load test.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use loadtest::attack::{self, RunOptions};
use loadtest::prefill::{PrefillOptions, prefill};
use loadtest::scenario::{Plan, Scenario};
use loadtest::thresholds::{Thresholds, evaluate, verdict_line};
use std::path::PathBuf;
use std::process::ExitCode;

/// Load test for distkv, built on Goose.
///
/// Exit status: 0 when every threshold held, 1 when one was missed, 2 when the run could
/// not be carried out at all.
#[derive(Debug, Parser)]
#[command(name = "distkv-loadtest", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario against a router and check thresholds.
    Run(RunArgs),
    /// Write every key of a keyspace once (v1 API), e.g. before a read benchmark.
    Prefill(PrefillArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Router base URL.
    #[arg(long, env = "DISTKV_HOST", default_value = "http://127.0.0.1:8080")]
    host: String,
    /// Workload to run.
    #[arg(long, value_enum, default_value = "demo")]
    scenario: Scenario,
    /// Concurrent users.
    #[arg(long, default_value_t = 8, value_parser = parse_at_least_one::<usize>)]
    users: usize,
    /// Users started per second.
    #[arg(long, default_value_t = 4.0, value_parser = parse_rate)]
    hatch_rate: f64,
    /// How long to run once every user has started (starting them takes users / hatch
    /// rate seconds first), e.g. 30s, 5m, 1h (a bare number is seconds).
    #[arg(long, default_value = "30s", value_parser = loadtest::duration::parse_secs)]
    duration: u64,
    /// Number of distinct keys [default: 10000, 1000 for large-values].
    #[arg(long)]
    keyspace: Option<u64>,
    /// Bytes per written value [default: 100, 65536 for large-values].
    #[arg(long)]
    value_size: Option<usize>,
    /// Write every key once before the run so reads hit.
    #[arg(long)]
    prefill: bool,
    /// Fail when the p99 response time over all requests exceeds this many ms.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail when failed/total exceeds this fraction (0 allows no failure at all).
    #[arg(long, value_parser = parse_fraction)]
    max_error_rate: Option<f64>,
    /// Directory for report.html and report.json (Goose) and summary.json.
    #[arg(long, default_value = "loadtest-report")]
    report_dir: PathBuf,
    /// Seconds between Goose's progress tables while running; 0 for none.
    #[arg(long, default_value_t = 10)]
    progress_secs: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10, value_parser = parse_at_least_one::<u64>)]
    timeout_secs: u64,
    /// Stay alive this long after writing the reports (e.g. 10m), so they can be copied
    /// out of the pod with `kubectl cp`, which needs `tar` in the image (the distkv image
    /// has none: loadtest/job.yaml keeps its reports on a volume instead).
    #[arg(long, value_parser = loadtest::duration::parse_secs)]
    linger: Option<u64>,
}

#[derive(Debug, Args)]
struct PrefillArgs {
    /// Router base URL.
    #[arg(long, env = "DISTKV_HOST", default_value = "http://127.0.0.1:8080")]
    host: String,
    /// Keys 0..N are written.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

/// A count that must be positive, e.g. `--users`; clap names the flag in front of the error.
fn parse_at_least_one<T: std::str::FromStr + Default + PartialEq>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v != T::default() => Ok(v),
        Ok(_) => Err("must be at least 1".to_string()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A rate per second that must be positive; Goose takes it as an `f32`, so it must neither
/// round to 0 nor overflow there.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (v as f32).is_finite() && (v as f32) > 0.0 => Ok(v),
        Ok(_) => Err("must be a number greater than 0".to_string()),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,goose=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Job logs and CI logs are files: escape codes there are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting tokio: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Prefill(a) => {
            run_prefill(&a.host, a.keys, a.value_size, a.concurrency).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => run(a).await,
    }
}

async fn run_prefill(host: &str, keys: u64, value_size: usize, concurrency: usize) -> Result<()> {
    let opts = PrefillOptions {
        host: host.to_string(),
        keys,
        value_size,
        concurrency,
    };
    let report = prefill(&opts).await.context("prefill")?;
    let secs = report.elapsed.as_secs_f64();
    tracing::info!(
        "prefill: wrote {} keys of {value_size} bytes in {secs:.1}s ({:.0} keys/s)",
        report.keys,
        report.keys as f64 / secs
    );
    Ok(())
}

async fn run(a: RunArgs) -> Result<ExitCode> {
    let plan = Plan::new(a.scenario, a.keyspace, a.value_size);
    // A summary.json left by an earlier run must not pass for this one's if it cannot be
    // carried out.
    let path = a.report_dir.join("summary.json");
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    if a.prefill {
        run_prefill(&a.host, plan.keyspace, plan.value_size, 32).await?;
    }
    let opts = RunOptions {
        host: a.host.clone(),
        users: a.users,
        hatch_rate: a.hatch_rate,
        duration_secs: a.duration,
        report_dir: Some(a.report_dir.clone()),
        progress_secs: a.progress_secs,
        timeout_secs: a.timeout_secs,
    };
    tracing::info!(
        "scenario {} against {}: {} users, {}s, keyspace {}, values of {} bytes",
        plan.scenario.name(),
        a.host,
        a.users,
        a.duration,
        plan.keyspace,
        plan.value_size
    );
    let mut summary = attack::run(plan, &opts).await?;
    let thresholds = Thresholds {
        max_p99_ms: a.max_p99_ms,
        max_error_rate: a.max_error_rate,
    };
    let misses = evaluate(&summary, &thresholds);
    summary.passed = misses.is_empty();
    summary.misses = misses.iter().map(ToString::to_string).collect();
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "reports: {}/{{report.html,report.json,summary.json}}",
        a.report_dir.display()
    );
    // One line of JSON in the log outlives the pod's emptyDir: `kubectl logs` keeps it.
    println!("summary: {}", serde_json::to_string(&summary)?);
    println!("{}", verdict_line(&summary, &thresholds, &misses));
    if let Some(secs) = a.linger {
        tracing::info!("lingering {secs}s so the reports can be copied out");
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    }
    Ok(if misses.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(args: &[&str]) -> String {
        let argv = ["distkv-loadtest"].iter().chain(args);
        match Cli::try_parse_from(argv) {
            Ok(cli) => panic!("{args:?} was accepted: {cli:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn zero_users_hatch_rate_and_timeout_are_rejected_naming_the_flag() {
        for (flag, value, why) in [
            ("--users", "0", "must be at least 1"),
            ("--hatch-rate", "0", "must be a number greater than 0"),
            ("--hatch-rate", "-2", "must be a number greater than 0"),
            ("--hatch-rate", "1e-60", "must be a number greater than 0"),
            ("--hatch-rate", "NaN", "must be a number greater than 0"),
            ("--timeout-secs", "0", "must be at least 1"),
        ] {
            // `--flag=value`, or clap would take `-2` for a flag of its own.
            let e = parse_error(&["run", &format!("{flag}={value}")]);
            assert!(e.contains(flag), "{flag} {value}: {e}");
            assert!(e.contains(why), "{flag} {value}: {e}");
        }
        let e = parse_error(&["run", "--users", "many"]);
        assert!(
            e.contains("--users") && e.contains("not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn a_zero_duration_says_it_must_be_greater_than_zero() {
        for value in ["0", "0s", "0m"] {
            let e = parse_error(&["run", "--duration", value]);
            assert!(e.contains("--duration"), "{e}");
            assert!(e.contains("must be greater than 0"), "{e}");
            assert!(!e.contains("expected a number"), "{e}");
        }
    }

    #[test]
    fn positive_values_still_parse() {
        let cli = Cli::try_parse_from([
            "distkv-loadtest",
            "run",
            "--users",
            "1",
            "--hatch-rate",
            "0.5",
            "--timeout-secs",
            "1",
            "--duration",
            "2m",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run: {cli:?}");
        };
        assert_eq!(
            (a.users, a.hatch_rate, a.timeout_secs, a.duration),
            (1, 0.5, 1, 120)
        );
    }
}
