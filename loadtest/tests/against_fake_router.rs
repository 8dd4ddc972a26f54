//! Runs the real `distkv-loadtest` binary against an in-process fake router, to check the
//! Goose wiring end to end without a cluster: requests are counted, wrong answers and
//! server errors turn into failures and a non-zero exit, reports are written.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Stores and returns values like distkv.
    Honest,
    /// Answers every read with the value of some other key.
    WrongValues,
    /// Answers every write with 503.
    RejectWrites,
}

type Store = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// Starts the fake on a free loopback port; the threads die with the test process.
fn start_fake(behaviour: Behaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Store = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let store = store.clone();
            std::thread::spawn(move || serve(stream, &store, behaviour));
        }
    });
    format!("http://{addr}")
}

fn serve(stream: TcpStream, store: &Store, behaviour: Behaviour) {
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
        let (status, reply) = handle(&method, &target, body, store, behaviour);
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
    b: Behaviour,
) -> (&'static str, Vec<u8>) {
    let unavailable = || {
        (
            "503 Service Unavailable",
            br#"{"error":{"code":"unavailable","message":"not enough in-sync replicas"}}"#.to_vec(),
        )
    };
    let mut map = store.lock().unwrap();
    let wrong = |key: &str| format!("{key}x|zzzz").into_bytes();
    if let Some(key) = target.strip_prefix("/v1/kv/") {
        return match method {
            "PUT" if b == Behaviour::RejectWrites => unavailable(),
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
        if b == Behaviour::RejectWrites {
            return unavailable();
        }
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

/// Runs the binary; returns its exit code and the parsed summary.json.
fn loadtest(host: &str, dir: &Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_distkv-loadtest"))
        .args(["run", "--host", host, "--users", "2", "--hatch-rate", "20"])
        .args([
            "--duration",
            "2s",
            "--progress-secs",
            "0",
            "--keyspace",
            "50",
        ])
        .arg("--report-dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PASS: ") || stdout.contains("FAIL: "),
        "no verdict line; stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read(dir.join("summary.json")).expect("summary.json written");
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&summary).unwrap(),
    )
}

#[test]
fn every_scenario_passes_against_an_honest_router_and_writes_reports() {
    let host = start_fake(Behaviour::Honest);
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
        let json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert!(
            json["raw_request_metrics"].is_array(),
            "{scenario}: Goose JSON report"
        );
    }
}

#[test]
fn reads_of_the_wrong_value_fail_the_run() {
    let host = start_fake(Behaviour::WrongValues);
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
    let host = start_fake(Behaviour::RejectWrites);
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
fn an_unreachable_router_fails() {
    // Bind then drop: nothing listens on the port afterwards.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (code, summary) = loadtest(
        &format!("http://127.0.0.1:{port}"),
        dir.path(),
        &["--max-p99-ms", "1000"],
    );
    assert_eq!(code, 1, "{summary:#}");
    assert_eq!(summary["misses"][0], "every request failed", "{summary:#}");
}
