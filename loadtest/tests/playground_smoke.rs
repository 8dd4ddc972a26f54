//! Smoke test against a real `distkv playground`: every scenario for a few seconds, with
//! requests made and none failed. Needs the `distkv` binary, so it is ignored by default;
//! CI runs it with
//! `DISTKV_BIN=target/release/distkv cargo test -p loadtest --test playground_smoke -- --ignored`.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// `$DISTKV_BIN`, else the release then the debug build in the workspace target dir.
///
/// Cargo runs tests from the package directory, so a relative `DISTKV_BIN` is taken
/// relative to the workspace root, where `.ci/run` and people invoke cargo.
fn distkv_bin() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    if let Some(p) = std::env::var_os("DISTKV_BIN") {
        return workspace.join(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let target = if target.is_relative() {
        workspace.join(target)
    } else {
        target
    };
    for profile in ["release", "debug"] {
        let candidate = target.join(profile).join("distkv");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "no distkv binary: set DISTKV_BIN or build it (cargo build --release -p dataplane); looked in {}",
        target.display()
    );
}

/// The playground process group; stopped on drop, even when an assertion panics.
struct Playground {
    child: Child,
    router: String,
}

impl Playground {
    fn start(data_dir: &Path) -> Playground {
        let bin = distkv_bin();
        let mut child = Command::new(&bin)
            .args([
                "playground",
                "--shards",
                "3",
                "--replicas",
                "2",
                "--port",
                "0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::piped())
            // Own group, so a leftover node can be killed along with the playground.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout for the playground's whole life: a full pipe would block it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[playground] {line}");
                if let Some(url) = line.trim().strip_prefix("router: ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut playground = Playground {
            child,
            router: String::new(),
        };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(url) => playground.router = url,
            Err(_) => panic!(
                "playground printed no `router: URL` line within {STARTUP_TIMEOUT:?} (exit: {:?})",
                playground.child.try_wait()
            ),
        }
        let json: Value =
            serde_json::from_slice(&std::fs::read(data_dir.join("playground.json")).unwrap())
                .unwrap();
        assert_eq!(
            json["router"],
            playground.router.as_str(),
            "playground.json agrees with stdout"
        );
        playground
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("[playground] stopped on SIGTERM: {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("[playground] still running 15s after SIGTERM; killing its process group");
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs the distkv binary; run by .ci/run with DISTKV_BIN set"]
fn every_scenario_runs_clean_against_a_playground() {
    let data = tempfile::tempdir().unwrap();
    let playground = Playground::start(data.path());
    for (scenario, keyspace) in [
        ("demo", "500"),
        ("read-heavy", "500"),
        ("write-heavy", "500"),
        ("large-values", "50"),
    ] {
        let reports = data.path().join(format!("report-{scenario}"));
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_distkv-loadtest"))
            .args(["run", "--host", &playground.router, "--scenario", scenario])
            .args([
                "--users",
                "2",
                "--hatch-rate",
                "10",
                "--duration",
                "3s",
                "--keyspace",
                keyspace,
            ])
            .args([
                "--max-error-rate",
                "0",
                "--progress-secs",
                "0",
                "--timeout-secs",
                "10",
            ])
            .arg("--report-dir")
            .arg(&reports)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let verdict = stdout
            .lines()
            .find(|l| l.starts_with("PASS") || l.starts_with("FAIL"));
        eprintln!(
            "{scenario}: {} in {:?}",
            verdict.unwrap_or("no verdict"),
            started.elapsed()
        );
        assert!(
            out.status.success(),
            "{scenario} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Value =
            serde_json::from_slice(&std::fs::read(reports.join("summary.json")).unwrap()).unwrap();
        assert!(
            summary["requests"].as_u64().unwrap() > 0,
            "{scenario}: {summary:#}"
        );
        assert_eq!(summary["failures"], 0, "{scenario}: {summary:#}");
        // Goose's own report must agree: its aggregated row counts the same requests.
        let goose: Value =
            serde_json::from_slice(&std::fs::read(reports.join("report.json")).unwrap()).unwrap();
        let aggregated = goose["raw_request_metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "Aggregated")
            .unwrap_or_else(|| panic!("{scenario}: no Aggregated row in report.json"));
        assert_eq!(
            aggregated["number_of_requests"], summary["requests"],
            "{scenario}"
        );
        assert_eq!(aggregated["number_of_failures"], 0, "{scenario}");
    }
    drop(playground);
}
