//! Runs the real `distkv-loadtest` binary against an in-process fake router, to check the
//! Goose wiring end to end without a cluster: requests are counted, wrong answers and
//! server errors turn into failures and a non-zero exit, reports are written and agree
//! with each other; `prefill` retries what is transient and stops on what is not.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Stores and returns values like distkv.
    Honest,
    /// Answers every read with the value of some other key.
    WrongValues,
    /// Answers every write with 503.
    RejectWrites,
    /// Answers every write with 413, as distkv does for a value over its limit.
    TooLarge,
    /// Answers the first two writes with 503, then behaves.
    FlakyWrites,
    /// Answers every request with 503.
    Unavailable,
}

type Store = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// A running fake router.
struct Fake {
    /// Its base URL.
    host: String,
    /// Write requests (v1 `PUT` and demo `POST /put`) received so far.
    writes: Arc<AtomicUsize>,
}

/// Starts the fake on a free loopback port; the threads die with the test process.
fn start_fake(behaviour: Behaviour) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Store = Arc::default();
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (store, counter) = (store.clone(), counter.clone());
            std::thread::spawn(move || serve(stream, &store, &counter, behaviour));
        }
    });
    Fake {
        host: format!("http://{addr}"),
        writes,
    }
}

/// A loopback URL nothing listens on: bound, then dropped.
fn dead_host() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

fn serve(stream: TcpStream, store: &Store, writes: &AtomicUsize, behaviour: Behaviour) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, reply) = handle(&method, &target, body, store, writes, behaviour);
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\n\r\n",
            reply.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&reply).is_err() {
            return;
        }
    }
}

fn handle(
    method: &str,
    target: &str,
    body: Vec<u8>,
    store: &Store,
    writes: &AtomicUsize,
    b: Behaviour,
) -> (&'static str, Vec<u8>) {
    let unavailable = || {
        (
            "503 Service Unavailable",
            br#"{"error":{"code":"unavailable","message":"not enough in-sync replicas"}}"#.to_vec(),
        )
    };
    if b == Behaviour::Unavailable {
        return unavailable();
    }
    if (method == "PUT" && target.starts_with("/v1/kv/")) || (method == "POST" && target == "/put")
    {
        let earlier = writes.fetch_add(1, Ordering::SeqCst);
        match b {
            Behaviour::RejectWrites => return unavailable(),
            Behaviour::FlakyWrites if earlier < 2 => return unavailable(),
            Behaviour::TooLarge => {
                return (
                    "413 Payload Too Large",
                    br#"{"error":{"code":"value_too_large","message":"value is larger than 1048576 bytes"}}"#
                        .to_vec(),
                );
            }
            _ => {}
        }
    }
    let mut map = store.lock().unwrap();
    let wrong = |key: &str| format!("{key}x|zzzz").into_bytes();
    if let Some(key) = target.strip_prefix("/v1/kv/") {
        return match method {
            "PUT" => {
                map.insert(key.to_string(), body);
                ("200 OK", Vec::new())
            }
            "GET" => match map.get(key) {
                Some(_) if b == Behaviour::WrongValues => ("200 OK", wrong(key)),
                Some(v) => ("200 OK", v.clone()),
                None => (
                    "404 Not Found",
                    br#"{"error":{"code":"not_found","message":"no such key"}}"#.to_vec(),
                ),
            },
            _ => ("405 Method Not Allowed", Vec::new()),
        };
    }
    if let Some(key) = target.strip_prefix("/get?key=") {
        let reply = match map.get(key) {
            Some(_) if b == Behaviour::WrongValues => {
                serde_json::json!({"key": key, "value": String::from_utf8(wrong(key)).unwrap()})
            }
            Some(v) => {
                serde_json::json!({"key": key, "value": String::from_utf8(v.clone()).unwrap()})
            }
            None => serde_json::json!({"status": "Key not found"}),
        };
        return ("200 OK", reply.to_string().into_bytes());
    }
    if target == "/put" && method == "POST" {
        let json: Value = serde_json::from_slice(&body).unwrap();
        let (k, v) = (
            json["key"].as_str().unwrap(),
            json["value"].as_str().unwrap(),
        );
        map.insert(k.to_string(), v.as_bytes().to_vec());
        return ("200 OK", br#"{"status":"Successful"}"#.to_vec());
    }
    ("404 Not Found", Vec::new())
}

/// Runs `distkv-loadtest run` for 2 s with 2 users (keyspace 50 unless `extra` gives one).
fn run_loadtest(host: &str, dir: &Path, extra: &[&str]) -> Output {
    let keyspace: &[&str] = if extra.contains(&"--keyspace") {
        &[]
    } else {
        &["--keyspace", "50"]
    };
    Command::new(env!("CARGO_BIN_EXE_distkv-loadtest"))
        .args(["run", "--host", host, "--users", "2", "--hatch-rate", "20"])
        .args(["--duration", "2s", "--progress-secs", "0"])
        .args(keyspace)
        .arg("--report-dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

/// Runs the binary; returns its exit code and the parsed summary.json, after checking that
/// Goose's report.json agrees with it.
fn loadtest(host: &str, dir: &Path, extra: &[&str]) -> (i32, Value) {
    let out = run_loadtest(host, dir, extra);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PASS: ") || stdout.contains("FAIL: "),
        "no verdict line; stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (summary, _) = reports(dir);
    (out.status.code().unwrap(), summary)
}

/// summary.json and Goose's report.json from `dir`, after checking that they count the
/// same requests and failures, and that Goose's ERRORS table lists each failure once.
fn reports(dir: &Path) -> (Value, Value) {
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).expect("summary.json"))
            .unwrap();
    let goose = goose_report(dir);
    let aggregated = goose["raw_request_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "Aggregated")
        .expect("an Aggregated row in report.json");
    assert_eq!(
        aggregated["number_of_requests"], summary["requests"],
        "{summary:#}"
    );
    assert_eq!(
        aggregated["number_of_failures"], summary["failures"],
        "{summary:#}"
    );
    assert_eq!(
        error_occurrences(&goose),
        summary["failures"].as_u64().unwrap(),
        "Goose's ERRORS table lists each failure once and nothing else: {:#}\n{summary:#}",
        goose["errors"]
    );
    (summary, goose)
}

fn goose_report(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json")).unwrap()
}

/// Sum of the counts in Goose's ERRORS table (`null` when it is empty).
fn error_occurrences(goose: &Value) -> u64 {
    match &goose["errors"] {
        Value::Null => 0,
        errors => errors
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["occurrences"].as_u64().unwrap())
            .sum(),
    }
}

/// Runs `distkv-loadtest prefill`; returns its output and how long it took.
fn prefill(host: &str, extra: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_distkv-loadtest"))
        .args(["prefill", "--host", host])
        .args(extra)
        .output()
        .unwrap();
    (out, started.elapsed())
}

#[test]
fn every_scenario_passes_against_an_honest_router_and_writes_reports() {
    let host = start_fake(Behaviour::Honest).host;
    for scenario in ["demo", "read-heavy", "write-heavy", "large-values"] {
        let dir = tempfile::tempdir().unwrap();
        let (code, summary) = loadtest(
            &host,
            dir.path(),
            &["--scenario", scenario, "--max-error-rate", "0"],
        );
        assert_eq!(code, 0, "{scenario}: {summary:#}");
        assert_eq!(summary["scenario"], scenario);
        assert!(
            summary["requests"].as_u64().unwrap() > 10,
            "{scenario}: {summary:#}"
        );
        assert_eq!(summary["failures"], 0, "{scenario}: {summary:#}");
        assert_eq!(summary["passed"], true);
        let names: Vec<&str> = summary["per_request"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "{scenario}: one GET and one write kind: {names:?}"
        );
        let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert!(html.contains("<html"), "{scenario}: HTML report");
        assert!(
            goose_report(dir.path())["raw_request_metrics"].is_array(),
            "{scenario}: Goose JSON report"
        );
    }
}

#[test]
fn missing_keys_are_successes_in_goose_reports_too() {
    // Hardly any of 1,000,000 keys is ever written: nearly every GET is a 404.
    let host = start_fake(Behaviour::Honest).host;
    let dir = tempfile::tempdir().unwrap();
    let out = run_loadtest(
        &host,
        dir.path(),
        &[
            "--scenario",
            "read-heavy",
            "--keyspace",
            "1000000",
            "--max-error-rate",
            "0",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let (summary, goose) = reports(dir.path());
    assert_eq!(summary["failures"], 0, "{summary:#}");
    let not_found = goose["status_code_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "GET" && r["name"] == "/v1/kv/{key}")
        .map(|r| r["status_codes"].as_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        not_found.contains("404"),
        "some GETs were 404: {not_found:?}"
    );
    assert_eq!(error_occurrences(&goose), 0, "{:#}", goose["errors"]);
    assert!(!stdout.contains("=== ERRORS ==="), "{stdout}");
}

#[test]
fn reads_of_the_wrong_value_fail_the_run() {
    let host = start_fake(Behaviour::WrongValues).host;
    for scenario in ["read-heavy", "demo"] {
        let dir = tempfile::tempdir().unwrap();
        // Prefill so reads find a key and the fake can answer with the wrong value.
        let (code, summary) = loadtest(
            &host,
            dir.path(),
            &[
                "--scenario",
                scenario,
                "--max-error-rate",
                "0.01",
                "--prefill",
            ],
        );
        assert_eq!(code, 1, "{scenario}: {summary:#}");
        assert!(
            summary["error_rate"].as_f64().unwrap() > 0.5,
            "{scenario}: {summary:#}"
        );
        assert_eq!(summary["passed"], false);
        assert!(
            summary["misses"][0]
                .as_str()
                .unwrap()
                .starts_with("error rate")
        );
    }
}

#[test]
fn rejected_writes_fail_the_run_but_pass_without_an_error_budget() {
    let host = start_fake(Behaviour::RejectWrites).host;
    let dir = tempfile::tempdir().unwrap();
    let (code, summary) = loadtest(
        &host,
        dir.path(),
        &["--scenario", "write-heavy", "--max-error-rate", "0"],
    );
    assert_eq!(code, 1, "{summary:#}");
    let rate = summary["error_rate"].as_f64().unwrap();
    assert!(
        rate > 0.7 && rate < 1.0,
        "about 90% are writes: {summary:#}"
    );

    let (code, summary) = loadtest(&host, dir.path(), &["--scenario", "write-heavy"]);
    assert_eq!(code, 0, "no threshold given, nothing to miss: {summary:#}");
}

#[test]
fn a_router_that_answers_only_errors_fails_the_run() {
    // The router is there and answers, but only with 503s: a result (exit 1), unlike a
    // router that cannot be reached at all.
    let host = start_fake(Behaviour::Unavailable).host;
    let dir = tempfile::tempdir().unwrap();
    let (code, summary) = loadtest(&host, dir.path(), &["--max-p99-ms", "1000"]);
    assert_eq!(code, 1, "{summary:#}");
    assert_eq!(summary["misses"][0], "every request failed", "{summary:#}");
}

#[test]
fn an_unreachable_router_cannot_be_load_tested() {
    let host = dead_host();
    let dir = tempfile::tempdir().unwrap();
    // An old summary must not be mistaken for this run's.
    std::fs::write(dir.path().join("summary.json"), "{}").unwrap();
    let out = run_loadtest(&host, dir.path(), &["--max-p99-ms", "1000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("error: no request reached {host}")),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(
        !stdout.contains("PASS") && !stdout.contains("FAIL"),
        "{stdout}"
    );
    assert!(!dir.path().join("summary.json").exists());
    // Users back off after a refused connection instead of spinning: 2 users for about
    // 2 s at one attempt per 100 ms is some 40 requests, not tens of thousands.
    let requests = goose_report(dir.path())["raw_request_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "Aggregated")
        .map(|r| r["number_of_requests"].as_u64().unwrap())
        .unwrap();
    assert!(requests > 0 && requests < 500, "{requests} requests");
}

#[test]
fn prefill_of_an_unreachable_router_fails_at_once_naming_the_host() {
    let host = dead_host();
    let (out, took) = prefill(&host, &["--keys", "10"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot connect to {host}")),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn prefill_stops_at_the_first_client_error_without_retrying() {
    let fake = start_fake(Behaviour::TooLarge);
    let (out, took) = prefill(&fake.host, &["--keys", "100", "--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HTTP 413 Payload Too Large"), "{stderr}");
    assert!(
        stderr.contains("value is larger than 1048576 bytes (value_too_large)"),
        "the server's message: {stderr}"
    );
    assert_eq!(fake.writes.load(Ordering::SeqCst), 1, "one PUT, no retry");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn prefill_retries_transient_errors() {
    let fake = start_fake(Behaviour::FlakyWrites);
    let (out, _) = prefill(&fake.host, &["--keys", "5", "--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        fake.writes.load(Ordering::SeqCst),
        7,
        "two 503s retried, then five writes"
    );
}
